"""Checkpoint files that are never half-written and never unpickle code: temp + fsync + rename, ``weights_only`` loads.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction without ``fsync``, and loads with full
pickle unless told otherwise. :class:`AtomicCheckpointIO` writes each checkpoint to a temp file beside the target,
flushes it to disk and renames it into place, so a crash at any instant leaves either the previous checkpoint or the
new one (``last.ckpt`` included, with ``ModelCheckpoint(save_last=True)``); it loads with
``torch.load(weights_only=True)`` and turns unreadable files into one-line errors that name the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_qlora.atomic import TEMP_MARK, atomic_write_bytes, fsync_path
from lightning_qlora.errors import first_line

log = logging.getLogger(__name__)


class CheckpointLoadError(ValueError):
    """A checkpoint file that cannot be read (truncated, not a checkpoint, or refused by ``weights_only``)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints atomically (temp file in the same folder, fsync, ``os.replace``, fsync the folder).

    Args:
        weights_only: load with ``torch.load(weights_only=True)`` (default): tensors, containers and primitives only,
            never arbitrary pickled code. Set False only for checkpoints you trust that hold other objects.
        stale_after_s: temp files older than this (left by a killed save) are removed at the next save.
    """

    def __init__(self, weights_only: bool = True, stale_after_s: float = 3600.0) -> None:
        super().__init__()
        self.weights_only = weights_only
        self.stale_after_s = stale_after_s

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Serialise ``checkpoint`` to ``path`` atomically.

        Raises:
            TypeError: if ``storage_options`` is given (not supported by this plugin).
        """
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint got storage_options={storage_options!r}; drop them")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent, self.stale_after_s)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a failure here touches no file
        atomic_write_bytes(path, buffer.getbuffer())  # temp names never end in .ckpt: `last` skips them

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load ``path`` with ``torch.load(weights_only=...)`` (this plugin's setting unless given).

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            CheckpointLoadError: if the file is truncated, not a torch checkpoint, or holds objects that
                ``weights_only`` loading refuses.
        """
        return load_checkpoint_file(path, map_location, self.weights_only if weights_only is None else weights_only)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        """Delete ``path`` (a missing file is fine; a sharded checkpoint folder from FSDP is removed whole)."""
        if Path(path).is_dir():
            shutil.rmtree(path)
            return
        Path(path).unlink(missing_ok=True)


def remove_stale_temp_files(folder: Path, older_than_s: float) -> list[Path]:
    """Delete ``.<name>.tmp-*`` files older than ``older_than_s`` in ``folder`` (left by a killed save)."""
    removed = []
    now = time.time()
    for tmp in folder.glob(f".*{TEMP_MARK}*"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


def load_checkpoint_file(path: _PATH, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """``torch.load`` with one-line errors that name the file and say what to do.

    Args:
        path: the checkpoint file.
        map_location: as for :func:`torch.load`.
        weights_only: refuse pickled code (tensors, containers and primitives only).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointLoadError: if it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass an existing .ckpt file or ckpt_path=last")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if weights_only and "weights_only" in str(err):
            culprit = _unsafe_global(str(err))
            raise CheckpointLoadError(
                f"checkpoint {path} holds a pickled object ({culprit}) that weights_only loading refuses; if you "
                "trust the file, load it with AtomicCheckpointIO(weights_only=False)"
            ) from err
        raise CheckpointLoadError(
            f"checkpoint {path} is not a readable torch checkpoint ({first_line(err, 200)})"
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, IndexError, ... for damaged files
        raise CheckpointLoadError(
            f"checkpoint {path} is truncated or corrupt ({first_line(err, 200)}); resume from an earlier checkpoint"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict"
        )
    return checkpoint


def _unsafe_global(message: str) -> str:
    for line in message.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")[:160]
    return "an unsupported global"


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
