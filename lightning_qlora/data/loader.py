"""``ResumableDataLoader``: a ``DataLoader`` that resumes mid-epoch, as Lightning's stateful-loader protocol asks.

The epoch's order is a pure function of ``seed + epoch`` (the sampler's job); the loader's state is only where
training stands in it, so a resumed run skips exactly the batches already trained (see
:class:`~lightning_qlora.ExactResume` for the other half of an exact resume, the randomness).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

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
