"""``QLoRAProgressBar``: training progress in optimizer steps, with the loss and tokens/s.

Lightning's bars count batches per epoch, which for a run bounded by ``max_steps`` (``max_epochs=-1``) reads
``Epoch 0/-2`` (rich) or restarts every epoch (tqdm). This bar counts optimizer steps up to ``max_steps``::

    step 12/40:  30%|███       | [00:41<01:36,  3.44s/step, train_loss=1.93, val_loss=2.10, tok/s=297]

:func:`use_qlora_progress_bar` puts it in place of the stock bar the Trainer added (``enable_progress_bar`` keeps
its meaning: off means no bar), and :class:`QuietLightningInternals` drops the deprecation warnings Lightning's own
code raises under newer torch, which no user setting can change.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

TOKENS_PER_SEC = "tok/s"
"""The progress bar's key for the training throughput (non-padding tokens per second on this device)."""


class QLoRAProgressBar(TQDMProgressBar):
    """A tqdm bar over optimizer steps (``step 3/5``) showing the progress-bar metrics and tokens/s.

    With ``max_steps`` set the training bar runs from the current ``global_step`` (a resumed run starts where it left
    off) to ``max_steps``; without it, it counts the batches of each epoch as Lightning's does, described as
    ``epoch 2/3``. Tokens are the non-padding tokens of each batch (a packed batch's ``num_tokens``, its
    ``attention_mask``, else every token of ``input_ids``); the rate is over the last ``window`` batches, timed
    from batch start to batch end. The logger's version number (``v_num``) is not shown.

    Args:
        refresh_rate: update the bar every this many batches (0 disables it).
        process_position: offset of the bars in lines, as for ``TQDMProgressBar``.
        leave: keep each epoch's finished bar, as for ``TQDMProgressBar``.
        window: batches the tokens/s figure is averaged over.
    """

    BAR_FORMAT = "{l_bar}{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False, window: int = 20) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._batches: deque[tuple[int, float]] = deque(maxlen=max(1, window))
        self._batch_start = 0.0

    @property
    def tokens_per_sec(self) -> float | None:
        """Training throughput over the last ``window`` batches (``None`` before the first batch ends)."""
        seconds = sum(s for _, s in self._batches)
        return sum(t for t, _ in self._batches) / seconds if seconds > 0 else None

    def _step_bounded(self) -> bool:
        max_steps = self.trainer.max_steps
        return max_steps is not None and max_steps > 0

    def _description(self) -> str:
        trainer = self.trainer
        if self._step_bounded():
            return f"step {trainer.global_step}/{trainer.max_steps}"
        epoch = f"epoch {trainer.current_epoch + 1}"
        return f"{epoch}/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else epoch

    @override
    def init_train_tqdm(self) -> Tqdm:
        if not self._step_bounded():
            return super().init_train_tqdm()
        return Tqdm(
            desc=self._description(),
            total=self.trainer.max_steps,
            initial=self.trainer.global_step,  # a resumed run starts where it stopped
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._batches.clear()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if not self._step_bounded():
            super().on_train_epoch_start(trainer)
            self.train_progress_bar.set_description(self._description())
        elif self._leave:  # a bar per epoch, each counting steps
            self.train_progress_bar = self.init_train_tqdm()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches.append((count_tokens(batch), time.perf_counter() - self._batch_start))
        if not self._step_bounded():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if self.is_enabled and (step % self.refresh_rate == 0 or step >= trainer.max_steps):
            bar.n = step
            bar.set_description(self._description(), refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._step_bounded() and not self.train_progress_bar.disable:
            self.train_progress_bar.set_description(self._description(), refresh=False)
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics (``self.log(..., prog_bar=True)``) and ``tok/s``, without ``v_num``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        rate = self.tokens_per_sec
        if rate is not None:
            items[TOKENS_PER_SEC] = int(round(rate))
        return items


def use_qlora_progress_bar(trainer: pl.Trainer) -> QLoRAProgressBar | None:
    """Put a :class:`QLoRAProgressBar` in place of the stock Lightning bar among ``trainer.callbacks``.

    A stock ``TQDMProgressBar`` or ``RichProgressBar`` is replaced even when configured explicitly (use
    ``RunSummary(progress_bar=False)`` to keep it); a bar of a subclass (someone's own) stays, and so does no bar at
    all (``enable_progress_bar=False``). Call it
    before the Trainer's ``setup`` hooks have reached the bar (e.g. from another callback's ``setup``, which comes
    first among the callbacks as the Trainer orders them); a bar swapped in later is set up here.

    Returns:
        The bar in use now when it is a :class:`QLoRAProgressBar`, else ``None``.
    """
    bar = trainer.progress_bar_callback
    if isinstance(bar, QLoRAProgressBar) or type(bar) not in (TQDMProgressBar, RichProgressBar):
        return bar if isinstance(bar, QLoRAProgressBar) else None
    new = QLoRAProgressBar()
    index = next(i for i, c in enumerate(trainer.callbacks) if c is bar)
    trainer.callbacks[index] = new
    if getattr(bar, "_trainer", None) is not None:  # its setup hook already ran: run the new bar's
        new.setup(trainer, trainer.lightning_module, trainer.state.fn)
    return new


def count_tokens(batch: Any) -> int:
    """Tokens of a batch that are not padding: ``num_tokens`` (packed), the ``attention_mask``'s sum, else all."""
    if isinstance(batch, dict):
        if batch.get("num_tokens") is not None:
            return int(batch["num_tokens"])
        if batch.get("attention_mask") is not None:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    return 0


LIGHTNING_INTERNAL_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning 2.6 builds torch's LeafSpec when it combines dataloaders; recent torch deprecates that class.
    (
        re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
)
"""``(message regex, category, module regex)`` of warnings that Lightning's own code raises and users cannot act on."""


class QuietLightningInternals:
    """Ignore :data:`LIGHTNING_INTERNAL_WARNINGS` between :meth:`enter` and :meth:`exit` (e.g. one fit).

    Each filter matches one message raised from one Lightning module, so the same deprecation raised by any other
    code still shows. Unlike ``warnings.catch_warnings`` this can span callback hooks: :meth:`exit` removes exactly
    the filters :meth:`enter` added and leaves any filter added in between.
    """

    def __init__(self) -> None:
        self._added: list[Any] = []

    def enter(self) -> None:
        """Add the filters (once)."""
        if self._added:
            return
        for message, category, module in LIGHTNING_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
            self._added.append(warnings.filters[0])

    def exit(self) -> None:
        """Remove the filters :meth:`enter` added (idempotent)."""
        for entry in self._added:
            if entry in warnings.filters:
                warnings.filters.remove(entry)
        self._added = []
