"""``lightning-qlora``: LightningCLI with ``fit``, ``validate``, ``test``, ``predict`` and ``evaluate`` (lm-eval).

``fit`` checks its outputs (run lock, writable folders, no untrained adapter over a trained one) before anything is
built (see :mod:`.fit_checks`). ``lightning-qlora memory --config recipe.yaml`` prints the memory plan of a recipe
(see :mod:`.memory`); ``lightning-qlora export --format gguf|safetensors|peft`` writes the fine-tune for
llama.cpp/Ollama, transformers or PEFT (see :mod:`.export`); ``generate``, ``chat`` and ``serve`` run it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_qlora.cli.fit_checks import CLI_LOCKS, check_fit_outputs, release_cli_locks
from lightning_qlora.cli.recipe import RECIPE_CLI_ARGS
from lightning_qlora.cli.run_config import SaveConfigWhenTrained
from lightning_qlora.utils.atomic import DiskFullError, is_disk_full
from lightning_qlora.utils.errors import first_line
from lightning_qlora.utils.finite import NonFiniteError
from lightning_qlora.utils.modules import model_root

ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


class QLoRATrainer(pl.Trainer):
    """A ``Trainer`` with an ``evaluate`` method: set up the model as ``validate`` would, then run lm-eval on it."""

    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        tasks: list[str] | str | None = None,
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
            tasks: lm-eval task or group names (default ``["mmlu"]``): a list, or one comma-separated string as
                lm-eval's own ``--tasks mmlu,hellaswag``.
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
        if isinstance(tasks, str):
            tasks = [name.strip() for name in tasks.split(",") if name.strip()]
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
            from lightning_qlora.lora.peft_format import import_peft

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
    """LightningCLI whose model and data come from YAML ``class_path``/``init_args`` (any LightningModule).

    Every run also gets :func:`default_guards` (exact resume, a stop on non-finite losses, out-of-memory advice).
    """

    @override
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "evaluate": {"model", "datamodule"}}

    @override
    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` once, safely (``weights_only``, one-line errors); the config's model arguments win.

        Lightning's CLI would replace the model's arguments with the checkpoint's, silently dropping the config's and
        the command line's (``--model.init_args.lr``), and even the base model: a checkpoint path would then resume
        as ``--ckpt_path last`` does not. Here both resume the model the config describes; the arguments that differ
        from the checkpoint's are named in one line, and the checkpoint's guards refuse another base or LoRA setting.
        """
        from lightning_qlora.plugins.checkpoint_io import load_checkpoint_file

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or _is_sharded_checkpoint(ckpt_path):
            return
        hparams = dict(load_checkpoint_file(ckpt_path).get("hyper_parameters") or {})
        init_args = self.config[subcommand].get("model", {}).get("init_args") or {}
        ours = dict(init_args.items()) if hasattr(init_args, "items") else {}
        changed = [
            f"{key}={ours[key]!r} (trained with {value!r})"
            for key, value in hparams.items()
            if not key.startswith("_") and key in ours and _comparable(ours[key]) != _comparable(value)
        ]
        if changed:
            print(
                f"lightning-qlora {subcommand}: resuming {ckpt_path} with the config's model arguments: "
                f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}",
                file=sys.stderr,
                flush=True,
            )

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--overwrite``: let a run that trains no step replace an existing adapter and ``summary.json``."""
        help_ = "fit: replace the adapter in LoRA's export_dir and summary.json even when this run trains no step"
        parser.add_argument("--overwrite", type=bool, default=False, help=help_)

    @override
    def before_instantiate_classes(self) -> None:
        """For ``fit``: :func:`check_fit_outputs` on the parsed config, before anything is built or loaded."""
        if self.subcommand == "fit":
            CLI_LOCKS.extend(check_fit_outputs(self.config["fit"]) or [])

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; ``fit --overwrite true`` lets ``LoRA`` and ``RunSummary`` replace their outputs."""
        if subcommand == "fit" and self.config["fit"].get("overwrite"):
            from lightning_qlora.callbacks.lora import LoRA
            from lightning_qlora.callbacks.summary import RunSummary

            for callback in self.trainer.callbacks:
                if isinstance(callback, (LoRA, RunSummary)):
                    callback.overwrite = True  # type: ignore[attr-defined]
        try:
            super()._run_subcommand(subcommand)
        finally:
            release_cli_locks()

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The configured Trainer plus the run guards the config leaves out (see :func:`default_guards`).

        Raises:
            ValueError: for ``--trainer.precision`` beside ``NF4Precision``, which sets the precision itself.
        """
        from lightning_qlora.plugins.precision import NF4Precision

        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = config.get("plugins") or []
        nf4 = [p for p in (plugins if isinstance(plugins, list) else [plugins]) if isinstance(p, NF4Precision)]
        if nf4 and config.get("precision") is not None:
            raise ValueError(
                f"--trainer.precision {config['precision']} was given beside the recipe's {nf4[0]!r}, which sets the "
                "precision itself; leave --trainer.precision out (choose the compute dtype with "
                "--trainer.plugins.init_args.compute_dtype bf16|fp16|fp32)"
            )
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend(default_guards(trainer.callbacks))
        return trainer


def default_guards(callbacks: list[Callback]) -> list[Callback]:
    """Guards every CLI run gets unless its config has its own: exact resume, NaN stop, out-of-memory advice.

    Args:
        callbacks: the callbacks already configured.

    Returns:
        New instances of :class:`~lightning_qlora.ExactResume`, :class:`~lightning_qlora.NonFiniteGuard` and
        :class:`~lightning_qlora.OutOfMemoryAdvice` for those not among ``callbacks``.
    """
    from lightning_qlora.callbacks.guards import NonFiniteGuard, OutOfMemoryAdvice
    from lightning_qlora.callbacks.resume import ExactResume

    have = {type(c) for c in callbacks}
    return [
        cls() for cls in (ExactResume, NonFiniteGuard, OutOfMemoryAdvice) if not any(issubclass(h, cls) for h in have)
    ]


def _comparable(value: Any) -> str:
    """A config value as text, tuples read as lists (a YAML list and the tuple a checkpoint saved are the same)."""
    if isinstance(value, tuple | list):
        return str([_comparable(v) for v in value])
    return str(value)


def _is_sharded_checkpoint(path: str) -> bool:
    """A distributed (FSDP) checkpoint folder: its strategy loads it, there is no single file to read."""
    folder = Path(path)
    return folder.is_dir() and ((folder / ".metadata").is_file() or (folder / "meta.pt").is_file())


_DESCRIPTION = (
    "QLoRA fine-tuning with Lightning. Training and evaluation (below) run a recipe: lightning-qlora fit --config "
    "recipes/demo/smollm2-135m-faq.yaml. Using the result: lightning-qlora generate | chat | serve (the tuned model "
    "from its recipe and adapter), export (GGUF, merged safetensors or a PEFT adapter), memory (predict a recipe's "
    "peak memory before running it); each takes --help."
)


def main(args: list[str] | None = None) -> None:
    """Console entry point. Bad input ends with one ``lightning-qlora: error: ...`` line and exit code 2.

    So do refused ``fit`` runs (see :func:`check_fit_outputs`): another live run in ``default_root_dir``, an output
    folder that is not writable, a run that trains no step over an existing adapter. A run that fails (non-finite
    loss, out of memory with :class:`~lightning_qlora.OutOfMemoryAdvice`, a full disk) ends with one line and exit
    code 1. Set ``LIGHTNING_QLORA_DEBUG=1`` to get the full traceback instead.

    Args:
        args: the command line (default ``sys.argv[1:]``).

    Raises:
        SystemExit: 2 for bad input, 1 for a failed run.
    """
    try:
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] == ["memory"]:  # the planner reads the recipe itself: nothing is instantiated
            from lightning_qlora.cli.memory import memory_command

            return memory_command(argv[1:])
        if argv[:1] == ["export"]:  # builds the model itself: no trainer
            from lightning_qlora.cli.export import export_command

            return export_command(argv[1:])
        _check_config_files(argv)
        if argv[:1] == ["generate"]:  # inference on the trained model (cli/inference.py builds it)
            from lightning_qlora.cli.generate import generate_command

            return generate_command(argv[1:], OneLineErrorParser)
        if argv[:1] == ["chat"]:
            from lightning_qlora.cli.chat import chat_command

            return chat_command(argv[1:], OneLineErrorParser)
        if argv[:1] == ["serve"]:
            from lightning_qlora.cli.serve import serve_command

            return serve_command(argv[1:], OneLineErrorParser)
        try:
            QLoRACLI(
                **RECIPE_CLI_ARGS,
                trainer_class=QLoRATrainer,
                parser_class=OneLineErrorParser,
                save_config_callback=SaveConfigWhenTrained,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"description": _DESCRIPTION},
                args=args,
            )
        finally:
            release_cli_locks()  # also when the run was refused or failed before it started
    except ONE_LINE_ERRORS as err:
        if os.environ.get("LIGHTNING_QLORA_DEBUG"):
            raise
        print(f"lightning-qlora: error: {_first_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteError, torch.OutOfMemoryError) as err:  # the run failed, not the input: exit 1
        if os.environ.get("LIGHTNING_QLORA_DEBUG"):
            raise
        advice = getattr(err, "lightning_qlora_advice", None)
        print(f"lightning-qlora: error: {advice or _first_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:  # a full disk while writing: the files already there are kept; exit 1
        if os.environ.get("LIGHTNING_QLORA_DEBUG") or not is_disk_full(err):
            raise
        if not isinstance(err, DiskFullError):
            err = DiskFullError(err.filename, None)
        print(f"lightning-qlora: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


_JSONARGPARSE_NOISE = (
    "Does not validate against",
    "Not a valid subclass",
    "Import path",
    "Expected a",
    "Subclass types expect",
    "a class path",
    "a dict ",
    "Problem with given class_path",
    "Subtypes:",
    "Errors:",
    "Given value",
)


def _first_line(err: BaseException) -> str:
    """The line that says what is wrong: for jsonargparse's nested Union reports, the class's own error inside."""
    chain: list[BaseException] = [err]
    while isinstance(chain[-1].__cause__, ONE_LINE_ERRORS) and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    for link in chain:
        text = str(link).strip()
        if not _is_wrapper(text):
            return first_line(link)
        for line in text.splitlines():
            cause = line.strip().removeprefix("- ").strip()
            if cause and not cause.startswith(_JSONARGPARSE_NOISE):
                return cause
    return first_line(err)


def _is_wrapper(text: str) -> bool:
    return text.startswith(("Does not validate against", "Not a valid subclass", "Expected a")) or (
        "Problem with given class_path" in text
    )


def _check_config_files(args: list[str]) -> None:
    """Name the file when a ``--config`` YAML is unreadable (jsonargparse's parse error does not)."""
    import yaml

    paths = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    paths += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    for path in paths:
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    yaml.safe_load(handle)
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                mark = getattr(err, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or _first_line(err)
                raise ValueError(f"config {path}{where}: not valid YAML ({problem}); fix the file") from None


if __name__ == "__main__":
    main()
