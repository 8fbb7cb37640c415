"""``ResumableCheckpoint``: Lightning's ``ModelCheckpoint`` keeping an atomic ``last.ckpt`` for resumable fine-tunes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_qlora.utils.atomic import TEMP_MARK, fsync_path


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for resumable fine-tunes: keeps ``last.ckpt`` every ``every_n_train_steps`` steps.

    Same arguments as Lightning's ``ModelCheckpoint``, with ``save_last=True`` and ``every_n_train_steps=50`` by
    default, and ``save_last="link"`` made atomic (the link is created under a temp name and renamed over
    ``last.ckpt``, so ``last`` never dangles or goes missing). Resume with ``ckpt_path="last"``.
    """

    def __init__(self, *args: Any, save_last: bool | str = True, every_n_train_steps: int | None = 50, **kwargs: Any):
        super().__init__(*args, save_last=save_last, every_n_train_steps=every_n_train_steps, **kwargs)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Save as ``ModelCheckpoint`` does, but after the validation due at this batch, if there is one.

        Lightning resumes a checkpoint written at a batch end as if that batch's validation had already run, so a
        save before it would lose that validation from the resumed run's history.
        """
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and not self._should_skip_saving_checkpoint(trainer) and _validation_due(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves then
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @staticmethod
    @override
    def _link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            folder = os.path.dirname(linkpath) or "."
            tmp = os.path.join(folder, f".{os.path.basename(linkpath)}{TEMP_MARK}{os.getpid()}-link")
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            os.symlink(os.path.relpath(filepath, folder), tmp)
            os.replace(tmp, linkpath)
            fsync_path(Path(folder), directory=True)
        trainer.strategy.barrier()


def _validation_due(trainer: Any) -> bool:
    """Whether Lightning runs validation right after the current training batch."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning version: save at once, as ModelCheckpoint does
        return False
