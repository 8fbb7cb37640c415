"""`LMEvalCallback`: run lm-eval tasks on the live module during and after `Trainer.fit`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_qlora.evaluation.tasks import EvaluationError, validate_tasks

log = logging.getLogger(__name__)


def refuse_sharded(trainer: Trainer, callback: Callback) -> None:
    """Refuse a callback that runs the model on rank 0 alone under a sharding strategy (it would deadlock).

    Raises:
        ValueError: naming the callback and what to do instead.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"{type(callback).__name__} runs the model on rank 0 alone, which a sharded strategy "
            f"({type(trainer.strategy).__name__}) cannot do; remove it and evaluate the exported adapter "
            "(lightning-qlora evaluate --adapter ...), or train with strategy='paged_ddp'"
        )


class LMEvalCallback(Callback):
    """Evaluate lm-eval tasks at chosen points of training and log the numbers to every Lightning logger.

    Evaluation runs on global rank 0 on `trainer.lightning_module` in place (eval mode + no_grad, previous
    train/eval modes restored, RNG states restored); the other ranks wait at `trainer.strategy.barrier()`.
    An evaluation error is broadcast so every rank raises it (no DDP deadlock). Sharded strategies that need all
    ranks in the forward pass (FSDP, DeepSpeed stage 3) are not supported.

    Args:
        tasks: lm-eval task/group names (checked at `setup`, so a typo fails before training).
        num_fewshot: few-shot examples (None: each task's default).
        limit: examples per task (int) or fraction (float); None for all.
        batch_size: requests per forward pass.
        every_n_epochs: also evaluate after every n-th training epoch.
        every_n_train_steps: also evaluate every n optimizer steps.
        on_fit_start: evaluate once before the first training step (baseline numbers, at `on_train_start`).
        on_fit_end: evaluate once when training ends (at `on_train_end`, while the model is still on its device),
            unless this step was just evaluated.
        include_path: folder(s) of extra task YAMLs.
        mmlu_path: local `cais/mmlu` copy (offline MMLU; see docs/evaluation.md).
        output_dir: where `lm_eval_step{global_step}.json` goes; default the checkpoint folder, else the log dir.
        log_prefix: metric name prefix (`lm_eval/mmlu/acc`).
    """

    def __init__(
        self,
        tasks: Sequence[str] | str = ("mmlu",),
        num_fewshot: int | None = 5,
        limit: int | float | None = None,
        batch_size: int = 8,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        on_fit_start: bool = False,
        on_fit_end: bool = True,
        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        mmlu_path: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        log_prefix: str = "lm_eval",
    ) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise EvaluationError(f"{name}={value!r} must be a positive integer or None")
        if num_fewshot is not None and num_fewshot < 0:
            raise EvaluationError(f"num_fewshot={num_fewshot} must be >= 0")
        self.tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
        self._tasks_as_given = tuple(self.tasks)
        self.num_fewshot = num_fewshot
        self.limit = limit
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        # stored under other names: `on_fit_start`/`on_fit_end` are Callback hook methods
        self.run_on_fit_start = on_fit_start
        self.run_on_fit_end = on_fit_end
        self.include_path = include_path
        self.mmlu_path = mmlu_path
        self.output_dir = output_dir
        self.log_prefix = log_prefix
        self.last_results: dict | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_output_path: Path | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        """``(global_step, flattened metrics)`` of every evaluation in this process."""
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Validate task names and paths on every rank, so all ranks fail together before training.

        Raises:
            ValueError: under a sharding strategy, where the model cannot run on rank 0 alone.
        """
        refuse_sharded(trainer, self)
        if stage != "fit":
            return
        for attr in ("model", "tokenizer"):  # `.model` may still be None: configure_model runs after setup
            if not hasattr(pl_module, attr):
                raise EvaluationError(f"LMEvalCallback needs the LightningModule to expose .{attr}")
        self.tasks = validate_tasks(self.tasks, include_path=self.include_path, mmlu_path=self.mmlu_path)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Baseline evaluation when `on_fit_start=True`."""
        if self.run_on_fit_start and trainer.global_step != self._last_eval_step:  # not again after a resume
            self._run(trainer, pl_module, "fit_start")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """Every `every_n_train_steps` optimizer steps (once per step under gradient accumulation)."""
        n = self.every_n_train_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0 and step != self._last_eval_step:
            self._run(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every `every_n_epochs` epochs."""
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_eval_step:
            self._run(trainer, pl_module, "epoch")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Final evaluation (`on_fit_end=True`): before Lightning's teardown moves the model to CPU."""
        if self.run_on_fit_end and trainer.global_step != self._last_eval_step:
            self._run(trainer, pl_module, "fit_end")

    @property
    def state_key(self) -> str:
        """Unique per task list, so several LMEvalCallbacks can be checkpointed side by side."""
        return self._generate_state_key(tasks=self._tasks_as_given, num_fewshot=self.num_fewshot)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state: the last evaluated step, its metrics, and every evaluation so far (step 0's too)."""
        return {
            "last_eval_step": self._last_eval_step,
            "last_metrics": dict(self.last_metrics),
            "history": [[step, dict(metrics)] for step, metrics in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a checkpoint: a resumed run's summary still compares against the first evaluation."""
        self._last_eval_step = state_dict.get("last_eval_step")
        self.last_metrics = dict(state_dict.get("last_metrics") or {})
        self.history = [(int(step), dict(metrics)) for step, metrics in state_dict.get("history") or []]

    def summary_rows(self) -> dict[str, str]:
        """Accuracy of each task at the first and last evaluation, for :class:`~lightning_qlora.RunSummary`."""
        if not self.history:
            return {}
        (first_step, first), (last_step, last) = self.history[0], self.history[-1]
        rows = {}
        for key in sorted(k for k in last if k.endswith("/acc")):
            task = key[len(self.log_prefix) + 1 : -len("/acc")]
            before = f"{first[key]:.3f} (step {first_step}) -> " if key in first and first_step != last_step else ""
            rows[f"lm-eval {task} acc"] = f"{before}{last[key]:.3f} (step {last_step})"
        return rows

    # ------------------------------------------------------------------ internals
    def resolve_output_dir(self, trainer: Trainer) -> Path:
        """`output_dir`, else the checkpoint folder, else the logger's folder, else `default_root_dir`."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        ckpt = getattr(trainer, "checkpoint_callback", None)
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _run(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        if trainer.sanity_checking:
            return
        from lightning_qlora.evaluation.run import evaluate, flatten_metrics, format_results_table, write_results_json

        step = trainer.global_step
        self._last_eval_step = step
        error: str | None = None
        metrics: dict[str, float] = {}
        exc: BaseException | None = None
        if trainer.is_global_zero:
            try:
                results = evaluate(
                    pl_module,
                    self.tasks,
                    num_fewshot=self.num_fewshot,
                    limit=self.limit,
                    batch_size=self.batch_size,
                    include_path=self.include_path,
                    mmlu_path=self.mmlu_path,
                )
                metrics = flatten_metrics(results, prefix=self.log_prefix)
                self.last_results = results
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
                    logger.save()
                path = self.resolve_output_dir(trainer) / f"lm_eval_step{step}.json"
                self.last_output_path = write_results_json(results, path)
                log.info("lm-eval (%s, step %d):\n%s", when, step, format_results_table(results))
            except Exception as err:  # re-raised on every rank below
                exc = err
                error = f"{type(err).__name__}: {err}"
        trainer.strategy.barrier("lm_eval_callback")
        error, metrics = trainer.strategy.broadcast((error, metrics), src=0)
        self.last_metrics = dict(metrics)
        if error is None:
            self.history.append((step, dict(metrics)))
        if error is not None:
            if exc is not None:
                raise exc
            raise EvaluationError(f"lm-eval failed on rank 0: {error}")
