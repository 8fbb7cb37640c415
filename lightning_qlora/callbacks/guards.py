"""Guards around a training step: non-finite losses or gradients, and out-of-memory errors with advice.

* :class:`NonFiniteGuard` checks the loss before backward and the gradients before every optimizer step. On a NaN or
  inf it either stops with one line naming the step, the batch and its data rows, or skips that update (gradients
  dropped, so the adapter is not touched). A NaN adapter is never written: the run stops before any checkpoint or
  export of the poisoned weights, and checkpoint/export code refuses non-finite adapters anyway.
* :class:`OutOfMemoryAdvice` turns ``torch.OutOfMemoryError`` into a message that says what to change (smaller
  micro-batch with more accumulation, gradient checkpointing, an 8-bit paged optimizer, shorter sequences).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_qlora.callbacks.lora import LoRA
from lightning_qlora.callbacks.summary import plan_for_run
from lightning_qlora.models.preference import PreferenceLM
from lightning_qlora.utils.finite import NonFiniteError
from lightning_qlora.utils.formatting import format_bytes

__all__ = ["NonFiniteError", "NonFiniteGuard", "OutOfMemoryAdvice", "describe_batch_rows", "oom_advice"]


def describe_batch_rows(trainer: pl.Trainer, batch: Any, limit: int = 4) -> str:
    """Name the data rows of ``batch`` (``data.jsonl line 38, line 42``) when the batch and data module allow it."""
    index = batch.get("row_index") if isinstance(batch, dict) else None
    if index is None:
        return "rows unknown: the batch has no row_index"
    indices = [int(i) for i in index.flatten().tolist()]
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "describe_rows"):
        names = datamodule.describe_rows(indices[:limit])
    else:
        names = [f"index {i}" for i in indices[:limit]]
    more = f" (+{len(indices) - limit} more)" if len(indices) > limit else ""
    return "rows " + ", ".join(names) + more


class NonFiniteGuard(Callback):
    """Stop (or skip the update) when the loss or a gradient is NaN/inf.

    Args:
        action: ``"stop"`` raises :class:`NonFiniteError` naming the step, batch index and data rows; ``"skip"``
            drops that optimizer step's gradients (the adapter is unchanged; the LR schedule still advances) and warns.
        check_gradients: also check trainable gradients before each optimizer step (catches overflow in backward).
        max_consecutive_skips: with ``"skip"``, stop after this many skipped updates in a row (a diverged run).

    Raises:
        ValueError: for an unknown ``action`` or a negative ``max_consecutive_skips``.
    """

    def __init__(
        self,
        action: Literal["stop", "skip"] = "stop",
        check_gradients: bool = True,
        max_consecutive_skips: int = 10,
    ) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard(action={action!r}) is not supported; use 'stop' or 'skip'")
        if max_consecutive_skips < 0:
            raise ValueError(f"NonFiniteGuard(max_consecutive_skips={max_consecutive_skips}) must be >= 0")
        self.action = action
        self.check_gradients = check_gradients
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps: list[int] = []
        """Global steps whose update was skipped."""
        self._batch: Any = None
        self._batch_idx = -1
        self._bad: str | None = None
        self._consecutive = 0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._batch, self._batch_idx = batch, idx

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._flag(trainer, f"non-finite loss ({float(loss.detach().float().mean())})")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._bad is None and self.check_gradients:
            name = _first_non_finite_grad(pl_module)
            if name is not None:
                self._flag(trainer, f"non-finite gradient of {name}")
        if self._bad is None:
            self._consecutive = 0
            return
        for group in optimizer.param_groups:  # skip: no gradient, no update (optimizers skip grad=None params)
            for param in group["params"]:
                param.grad = None
        self.skipped_steps.append(trainer.global_step)
        self._consecutive += 1
        rank_zero_warn(f"NonFiniteGuard: skipped the update of step {trainer.global_step}: {self._bad}")
        self._bad = None
        if self._consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self._consecutive} updates in a row had non-finite losses or gradients (last at step "
                f"{trainer.global_step}); the run has diverged: lower the learning rate or check the data"
            )

    def _flag(self, trainer: pl.Trainer, what: str) -> None:
        where = (
            f"at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx}; "
            f"{describe_batch_rows(trainer, self._batch)})"
        )
        if self.action == "stop":
            raise NonFiniteError(
                f"{what} {where}; no checkpoint or adapter was written for it: fix or drop those rows, lower the "
                "learning rate, or use NonFiniteGuard(action='skip')"
            )
        self._bad = self._bad or f"{what} {where}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = list(state_dict.get("skipped_steps", []))


def _first_non_finite_grad(module: torch.nn.Module) -> str | None:
    grads = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for _, g in grads])
    if bool(torch.isfinite(norms).all()):  # one sync for the common case
        return None
    return next(name for (name, _), norm in zip(grads, norms.tolist()) if not math.isfinite(norm))


def oom_advice(trainer: pl.Trainer, pl_module: pl.LightningModule, batch_shape: tuple[int, ...] | None) -> list[str]:
    """What to change after an out-of-memory error, from the memory planner or the run's current settings.

    The planner's advice (each change with the peak it leads to) is used when it knows the model.

    Args:
        trainer: the trainer that ran out of memory.
        pl_module: its module.
        batch_shape: ``(batch, sequence)`` of the failing batch, when known.

    Returns:
        Short suggestions (each names the option to change).
    """
    planned = _planner_advice(trainer, pl_module, batch_shape)
    if planned:
        return planned
    advice = []
    lora = next((cb for cb in trainer.callbacks if isinstance(cb, LoRA)), None)  # type: ignore[attr-defined]
    if lora is not None and not lora.gradient_checkpointing:
        advice.append("turn on gradient checkpointing (LoRA(gradient_checkpointing=true)): activations shrink most")
    rows_per_item = 2 if isinstance(pl_module, PreferenceLM) else 1  # a pair is a chosen and a rejected row
    items = batch_shape[0] // rows_per_item if batch_shape else 0
    if items > 1:
        half = max(1, items // 2)
        accumulate = trainer.accumulate_grad_batches * (items // half)
        unit = " pairs" if rows_per_item == 2 else ""
        advice.append(
            f"halve the micro-batch (batch_size={half}{unit}) and set trainer.accumulate_grad_batches={accumulate} to "
            "keep the same effective batch"
        )
    optimizer_name = type(trainer.optimizers[0]).__name__ if trainer.optimizers else ""
    if "8bit" not in optimizer_name:
        advice.append("use an 8-bit paged optimizer (PagedOptimizerStrategy(optimizer='paged_adamw_8bit'))")
    if batch_shape and len(batch_shape) > 1 and batch_shape[1] > 512:
        advice.append(f"shorten sequences (max_length below {batch_shape[1]})")
    advice.append("plan it first: lightning-qlora memory --config <recipe.yaml>")
    return advice


def _planner_advice(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch_shape: tuple[int, ...] | None
) -> list[str]:
    """The memory planner's suggestions for this run, aimed below both the device and the planned peak."""
    if not batch_shape or len(batch_shape) != 2:
        return []
    plan = plan_for_run(trainer, pl_module, (int(batch_shape[0]), int(batch_shape[1])))
    if plan is None:
        return []
    budget = int(plan.peak * 0.9)  # it ran out, so aim below what was planned
    device = trainer.strategy.root_device
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory)
    tips = plan.advice(budget)
    return [f"(planned peak {format_bytes(plan.peak)}) {tips[0]}", *tips[1:]] if tips else []


class OutOfMemoryAdvice(Callback):
    """On ``torch.OutOfMemoryError``, attach advice to the error (shown under its traceback) and log it.

    The ``lightning-qlora`` command prints only the one-line summary and the advice.
    """

    def __init__(self) -> None:
        self._shape: tuple[int, ...] | None = None
        self.message: str | None = None
        """The last out-of-memory explanation, also added to the exception as a note."""

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        self._shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, torch.OutOfMemoryError):
            return
        shape = "x".join(map(str, self._shape)) if self._shape else "unknown shape"
        self.message = f"out of memory at step {trainer.global_step} (batch {shape}): " + "; or ".join(
            oom_advice(trainer, pl_module, self._shape)
        )
        if hasattr(exception, "add_note"):
            exception.add_note(f"lightning_qlora: {self.message}")
        exception.lightning_qlora_advice = self.message  # type: ignore[attr-defined]
        rank_zero_warn(self.message)
