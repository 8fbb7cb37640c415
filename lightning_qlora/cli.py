"""``lightning-qlora``: LightningCLI with ``fit``, ``validate``, ``test``, ``predict`` and ``evaluate`` (lm-eval)."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_qlora.callback import model_root

ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


class QLoRATrainer(pl.Trainer):
    """A ``Trainer`` with an ``evaluate`` method: set up the model as ``validate`` would, then run lm-eval on it."""

    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        tasks: list[str] | None = None,
        num_fewshot: int | None = None,
        limit: float | None = None,
        batch_size: int = 8,
        ckpt_path: str | None = None,
        adapter: str | None = None,
        mmlu_path: str | None = None,
        include_path: str | None = None,
        output_path: str | None = None,
    ) -> dict[str, Any]:
        """Evaluate the (quantized, adapted) model with lm-eval and print lm-eval's results table.

        Args:
            model: the LightningModule (its ``.model``/``.tokenizer`` are evaluated).
            datamodule: optional; its validation set also runs (held-out loss).
            tasks: lm-eval task or group names (default ``["mmlu"]``).
            num_fewshot: few-shot examples per task (MMLU in the paper: 5).
            limit: examples per task (int) or fraction (float < 1), for quick checks.
            batch_size: lm-eval batch size.
            ckpt_path: a Lightning checkpoint to restore (adapter weights) first.
            adapter: a PEFT adapter directory to load first.
            mmlu_path: a local copy of ``cais/mmlu`` (one folder per subject) for offline MMLU.
            include_path: an extra folder of lm-eval task YAMLs.
            output_path: write the full results JSON here.

        Returns:
            lm-eval's results dict.
        """
        runner = _EvaluateOnValidationStart(
            tasks=tasks or ["mmlu"],
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            adapter=adapter,
            mmlu_path=mmlu_path,
            include_path=include_path,
            output_path=output_path,
        )
        if runner.tasks:
            from lightning_qlora.evaluation.tasks import validate_tasks

            validate_tasks(runner.tasks, include_path=include_path, mmlu_path=mmlu_path)
        self.callbacks.append(runner)
        if datamodule is None:
            self.limit_val_batches = 0
        try:
            self.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=datamodule is not None)
            if runner.results is None:  # no validation batches: Lightning skips the hook, so run it here
                runner.run(model)
        finally:
            self.callbacks.remove(runner)
        return runner.results or {}


class _EvaluateOnValidationStart(Callback):
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)
        self.results: dict[str, Any] | None = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(pl_module)

    def run(self, pl_module: pl.LightningModule) -> None:
        from lightning_qlora.evaluation.run import evaluate, format_results_table

        if getattr(pl_module, "model", None) is None and hasattr(pl_module, "configure_model"):
            pl_module.configure_model()
        if self.adapter:
            from lightning_qlora.peft_format import import_peft

            import_peft(model_root(pl_module), self.adapter)
        self.results = evaluate(
            pl_module,
            tasks=self.tasks,
            num_fewshot=self.num_fewshot,
            limit=self.limit,
            batch_size=self.batch_size,
            include_path=self.include_path,
            mmlu_path=self.mmlu_path,
            output_path=self.output_path,
        )
        print(format_results_table(self.results), flush=True)


class OneLineErrorParser(LightningArgumentParser):
    """An argument parser whose errors are one ``lightning-qlora: error: ...`` line (exit code 2), not a usage dump."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if os.environ.get("LIGHTNING_QLORA_DEBUG") or not self.exit_on_error:
            super().error(message, ex)
        first = " ".join(message.split()) or "invalid arguments"  # jsonargparse nests causes over lines
        specific = re.search(r"Problem with given class_path (.*?)(?: - Expected a|$)", first)
        if specific:  # a subclass-mode key: say which class and option rather than the Union bookkeeping
            first = f"{first.split(':')[0]}: {specific.group(1).strip()}"
        first = first[:400]
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"lightning-qlora: error: {first} (options: {prog} --help)\n")
        raise SystemExit(2)


class QLoRACLI(LightningCLI):
    """LightningCLI whose model and data come from YAML ``class_path``/``init_args`` (any LightningModule)."""

    @override
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "evaluate": {"model", "datamodule"}}


def main(args: list[str] | None = None) -> None:
    """Console entry point. Bad input ends with one ``lightning-qlora: error: ...`` line and exit code 2.

    Set ``LIGHTNING_QLORA_DEBUG=1`` to get the full traceback instead.
    """
    try:
        QLoRACLI(
            model_class=pl.LightningModule,
            datamodule_class=None,  # optional: `evaluate` needs no data
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=QLoRATrainer,
            parser_class=OneLineErrorParser,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except ONE_LINE_ERRORS as err:
        if os.environ.get("LIGHTNING_QLORA_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lightning-qlora: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
