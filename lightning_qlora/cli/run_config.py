"""``config.yaml`` of a ``fit``, written once the run has trained: a refused or failed run keeps the folder's recipe."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override


class SaveConfigWhenTrained(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``, writing ``config.yaml`` after the run's first optimizer step.

    Lightning writes it at setup, so a run that is then refused, fails before training or trains no step (a typo'd
    ``--trainer.max_epochs 0``) would replace the recipe of the adapter and checkpoints already in the folder. Here
    it is written once this run has changed something (before its first checkpoint or adapter can be); ``validate``,
    ``test`` and ``predict`` runs, which write neither, leave it alone.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_step: int | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing yet (see the class docstring)."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step  # a resumed run starts past 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.already_saved and self._start_step is not None and trainer.global_step > self._start_step:
            super().setup(trainer, pl_module, "fit")  # on every rank at once: it broadcasts


__all__ = ["SaveConfigWhenTrained"]
