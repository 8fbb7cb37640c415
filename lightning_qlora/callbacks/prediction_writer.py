"""``JSONLPredictionWriter``: Lightning's ``BasePredictionWriter`` streaming predictions to a JSONL file, atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lightning_qlora.utils.atomic import TEMP_MARK, DiskFullError, _umask, fsync_path, is_disk_full


class JSONLPredictionWriter(BasePredictionWriter):
    """Write each predicted batch as JSON lines as soon as it is done; the file appears complete, or not at all.

    Lines go to a hidden temp file next to ``path`` (``.<name>.tmp-<pid>-*``, flushed after every batch, so a long
    run can be followed with ``tail -f``); when prediction ends the temp file is fsynced and renamed over ``path``.
    A run that fails or is interrupted removes the temp file and leaves an existing ``path`` as it was.
    (``atomic_write_text`` needs the whole text at once; predictions arrive a batch at a time.)

    Args:
        path: the ``.jsonl`` file to create or replace.

    Raises:
        ValueError: if ``path`` is a folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ValueError(f"output {self.path} is a folder; pass a .jsonl file path")
        self.rows_written = 0
        self._tmp: Path | None = None
        self._handle: IO[str] | None = None

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}{TEMP_MARK}{os.getpid()}-")
        except OSError as err:
            _raise_disk_full(err, self.path)
            raise
        os.fchmod(fd, 0o666 & ~_umask())
        self._tmp, self._handle = Path(tmp), os.fdopen(fd, "w", encoding="utf-8")
        self.rows_written = 0

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Sequence[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append one JSON line per prediction of the batch and flush."""
        if self._handle is None:
            return
        try:
            self._handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction)
            self._handle.flush()
        except OSError as err:
            self._discard()
            _raise_disk_full(err, self.path)
            raise
        self.rows_written += len(prediction)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the complete file into place (fsync, rename, fsync the folder)."""
        if self._handle is None or self._tmp is None:
            return
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self._tmp, self.path)
        except OSError as err:
            self._discard()
            _raise_disk_full(err, self.path)
            raise
        self._handle = self._tmp = None
        fsync_path(self.path.parent, directory=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Drop the partial file: an existing ``path`` is kept as it was."""
        self._discard()

    def _discard(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._handle.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._handle = self._tmp = None


def _raise_disk_full(err: OSError, path: Path) -> None:
    """Raise a full disk as :class:`DiskFullError` (one line naming ``path``); any other error is the caller's."""
    if is_disk_full(err):
        raise DiskFullError(path) from err


__all__ = ["JSONLPredictionWriter"]
