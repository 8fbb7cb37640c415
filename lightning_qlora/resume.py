"""Exact resume: after a crash, ``fit(ckpt_path="last")`` ends with the same adapter bits as an uninterrupted run.

Lightning restores weights, optimizer, LR schedulers, loop counters and the gradient-accumulation phase (checkpoints
are written at optimizer-step boundaries). Two things it leaves out are added here:

* **Data position**: :class:`ResumableDataLoader` records how many batches of the current epoch were trained and, on
  resume, skips exactly those (the epoch's order is a pure function of ``seed + epoch``), so no row is seen twice or
  missed. Lightning saves and restores it as a stateful loader.
* **Randomness** (dropout masks): :class:`ExactResume` reseeds torch, Python and NumPy before every training batch
  from ``(seed, epoch, batch_idx)``, as fairseq does per update. RNG draws between batches (validation, lm-eval,
  a fresh DataLoader iterator) then cannot shift the masks of later steps, with or without a restart.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

Progress = Callable[[], tuple[int, int]]
"""Returns ``(epoch, batches of that epoch already drawn for training)``."""


def trainer_progress(trainer: pl.Trainer) -> tuple[int, int]:
    """``(current epoch, training batches drawn in it)`` as Lightning's loops count them right now.

    Inside ``on_train_batch_end`` and after a mid-epoch validation both count the batch just trained.
    """
    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that resumes mid-epoch: its state is the epoch and the number of batches already trained.

    Args:
        *args: as for ``DataLoader``; the sampler must give the same order for the same epoch (seeded).
        progress: returns ``(epoch, batches drawn)``; set by the data module to read the trainer's loop counters.
        **kwargs: as for ``DataLoader``.
    """

    def __init__(self, *args: Any, progress: Progress | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where training stands in this loader (empty before training)."""
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip the ``batches`` already trained in ``epoch`` the next time that epoch is iterated."""
        if state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        if self._resume is None:
            return iterator
        epoch, skip = self._resume
        self._resume = None
        current = self.progress()[0] if self.progress is not None else epoch
        if current != epoch or skip <= 0:
            return iterator
        return itertools.islice(iterator, skip, None)  # skipped batches are collated but never trained


def is_resumable(trainer: pl.Trainer) -> bool:
    """Whether every training loader of ``trainer`` restores its position (Lightning's stateful-loader protocol)."""
    loader = trainer.fit_loop._combined_loader
    return loader is not None and all(isinstance(dl, _Stateful) for dl in loader.flattened)


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """The seed of one training batch: a fixed mix of the run seed, epoch, batch index and process rank.

    The rank term gives data-parallel ranks different dropout masks; it is 0 in a single process.
    """
    return (seed * 1_000_003 + epoch * 10_007 + batch_idx + rank * 1_000_000_007) % (2**63 - 1)


class ExactResume(Callback):
    """Make a fine-tune resumable to the bit: per-batch seeds, and a warning when the data loader cannot resume.

    Use with ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` (or
    :class:`~lightning_qlora.checkpoint_io.ResumableCheckpoint`) and resume with ``ckpt_path="last"``.

    Args:
        seed: run seed; default the one given to ``seed_everything`` (``PL_GLOBAL_SEED``), else 0. A resumed run
            uses the seed stored in the checkpoint.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._warned = False

    @property
    def state_key(self) -> str:
        """One state per Trainer, whatever the arguments."""
        return "ExactResume"

    def _run_seed(self) -> int:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self.seed

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._warned and trainer.num_training_batches != float("inf") and not is_resumable(trainer):
            self._warned = True
            rank_zero_warn(
                "ExactResume: the training DataLoader does not record its position, so a resumed run restarts its "
                "epoch; use InstructionDataModule or a lightning_qlora.resume.ResumableDataLoader"
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        seed = step_seed(self._run_seed(), trainer.current_epoch, idx, trainer.global_rank)
        torch.manual_seed(seed)  # all devices
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % 2**32)
        except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
            pass

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._run_seed()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("seed")
        if saved is not None and self.seed is not None and int(saved) != self.seed:
            rank_zero_warn(f"ExactResume: resuming with the checkpoint's seed {saved} instead of seed={self.seed}")
        if saved is not None:
            self.seed = int(saved)
