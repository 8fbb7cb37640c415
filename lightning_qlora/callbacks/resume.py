"""Exact resume: after a crash, ``fit(ckpt_path="last")`` ends with the same adapter bits as an uninterrupted run.

Lightning restores weights, optimizer, LR schedulers, loop counters and the gradient-accumulation phase (checkpoints
are written at optimizer-step boundaries). Two things it leaves out are added here:

* **Data position**: :class:`~lightning_qlora.data.loader.ResumableDataLoader` records how many batches of the
  current epoch were trained and, on resume, skips exactly those (the epoch's order is a pure function of
  ``seed + epoch``), so no row is seen twice or missed. Lightning saves and restores it as a stateful loader.
* **Randomness** (dropout masks): :class:`ExactResume` reseeds torch, Python and NumPy before every training batch
  from ``(seed, epoch, batch_idx)``, as fairseq does per update. RNG draws between batches (validation, lm-eval,
  a fresh DataLoader iterator) then cannot shift the masks of later steps, with or without a restart.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override


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
    :class:`~lightning_qlora.plugins.checkpoint_io.ResumableCheckpoint`) and resume with ``ckpt_path="last"``.

    Args:
        seed: run seed; default the one given to ``seed_everything`` (``PL_GLOBAL_SEED``), else 0. A resumed run
            uses the seed stored in the checkpoint.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._warned = False
        self._data: dict[str, int] | None = None  # this run's training data, in batches and rows an epoch
        self._saved_data: dict[str, int] | None = None  # the checkpoint's

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
        self._data = _data_shape(trainer)
        saved, now = self._saved_data, self._data
        if saved and now and saved != now:
            rank_zero_warn(
                f"ExactResume: the checkpoint was trained on {_words(saved)} an epoch, this run has {_words(now)}: "
                "the resumed position no longer points at the same rows, so this is not an exact resume (resume with "
                "the data and batch size the run started with)"
            )
        if not self._warned and trainer.num_training_batches != float("inf") and not is_resumable(trainer):
            self._warned = True
            rank_zero_warn(
                "ExactResume: the training DataLoader does not record its position, so a resumed run restarts its "
                "epoch; use InstructionDataModule or a lightning_qlora.callbacks.resume.ResumableDataLoader"
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
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Resume a checkpoint written after an epoch's last batch at the next epoch's first batch.

        Lightning 2.6 counts that epoch as finished twice when it restores such a checkpoint (a save from
        ``on_train_batch_end`` at the last batch): the resumed run skips a whole epoch, its rows and its seeds.
        Clearing the saved ``is_last_batch`` lets the epoch end once, as in the uninterrupted run: the loader's
        recorded position (a stateful loader's state is in the checkpoint) ends it. Only that case is touched (the
        batch saved before its ``completed`` count, inside the epoch): a save after validation or at the epoch's
        end, or a loader without a length or a recorded position, keeps Lightning's own restart. Callbacks are
        restored before the loops, so the loops read the fix.
        """
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        batches, epochs = loop.get("epoch_loop.batch_progress"), loop.get("epoch_progress")
        if not batches or not epochs or not batches.get("is_last_batch"):
            return
        total = batches["total"]
        saved_at_batch_end = total["completed"] == total["processed"] - 1
        inside_epoch = epochs["current"]["processed"] < epochs["current"]["started"]
        if saved_at_batch_end and inside_epoch and loop.get("state_dict", {}).get("combined_loader"):
            batches["is_last_batch"] = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._run_seed(), "data": self._data}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("seed")
        if saved is not None and self.seed is not None and int(saved) != self.seed:
            rank_zero_warn(f"ExactResume: resuming with the checkpoint's seed {saved} instead of seed={self.seed}")
        if saved is not None:
            self.seed = int(saved)
        self._saved_data = state_dict.get("data")


def _data_shape(trainer: pl.Trainer) -> dict[str, int] | None:
    """The training data's batches (and rows, where the dataset has a length) an epoch; None when unknown."""
    batches = trainer.num_training_batches
    if batches == float("inf"):
        return None
    shape = {"batches": int(batches)}
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        shape["rows"] = len(dataset)
    return shape


def _words(shape: dict[str, int]) -> str:
    rows = f"{shape['rows']} rows in " if "rows" in shape else ""
    return f"{rows}{shape['batches']} batches"
