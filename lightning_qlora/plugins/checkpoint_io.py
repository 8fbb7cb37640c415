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
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

from lightning_qlora.utils.atomic import TEMP_MARK, DiskFullError, atomic_write_bytes, is_disk_full, pid_alive
from lightning_qlora.utils.errors import first_line

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
            DiskFullError: if the device is full (names ``path`` and the checkpoint's size); the previous file at
                ``path`` is kept and no temp file is left.
        """
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint got storage_options={storage_options!r}; drop them")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a failure here touches no file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(path, buffer.getbuffer().nbytes) from err
            raise
        remove_stale_temp_files(path.parent, self.stale_after_s)
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
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))
        hint = f"pass a file in it, such as {found[-1]}" if found else "pass a .ckpt file"
        if (path / "adapter_config.json").is_file():
            hint = "it is a PEFT adapter: load it with `evaluate --adapter` or `import_peft`, or pass a .ckpt file"
        raise CheckpointLoadError(f"checkpoint {path} is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass an existing .ckpt file or ckpt_path=last")
    if _is_safetensors(path):
        raise CheckpointLoadError(
            f"checkpoint {path} is a safetensors file (model or adapter weights), not a Lightning checkpoint; pass a "
            "ResumableCheckpoint .ckpt, or its folder to `evaluate --adapter` if it is a PEFT adapter"
        )
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


def remove_cut_off_saves(folder: Path, pattern: str = "*.ckpt") -> list[Path]:
    """Delete temp files of saves to ``folder/<pattern>`` whose writer process is gone (a save a kill cut off).

    Temp names carry the writer's pid (``.<name>.tmp-<pid>-<random>``); those of a live process are kept.

    Args:
        folder: a checkpoint folder.
        pattern: the checkpoint names whose temp files to look for.

    Returns:
        The files removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".{pattern}{TEMP_MARK}*"):
        pid = re.match(rf".*{re.escape(TEMP_MARK)}(\d+)-", tmp.name)
        writer = int(pid.group(1)) if pid else None
        # this process is not saving while it resolves a checkpoint to resume: its own old temp files are cut off too
        if writer is not None and (writer == os.getpid() or not pid_alive(writer)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _is_safetensors(path: Path) -> bool:
    """Safetensors files start with an 8-byte little-endian header length and then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size


def checkpoint_global_step(path: _PATH) -> int | None:
    """The ``global_step`` a checkpoint file was saved at, read without loading its tensors (``mmap``).

    Args:
        path: a Lightning checkpoint file.

    Returns:
        The step, or ``None`` when ``path`` is not a readable checkpoint file holding one (a sharded folder, a
        damaged file): callers then cannot tell and should not refuse anything on its account.
    """
    try:
        checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one), damaged, a folder: unknown
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) else None


def find_last_checkpoint(folders: list[Path]) -> str | None:
    """The newest ``last.ckpt`` (or ``last-v<n>.ckpt``) in ``folders``, as ``ckpt_path="last"`` would resume.

    Args:
        folders: checkpoint folders (``ModelCheckpoint.dirpath``).
    """
    found = [p for f in folders for p in Path(f).glob("last*.ckpt") if re.fullmatch(r"last(-v\d+)?", p.stem)]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def later_run_note(path: _PATH) -> str:
    """``"; note: ..."`` if ``path`` is a ``last[-v<n>].ckpt`` and a later run left a newer one beside it, else ``""``.

    Lightning keeps an earlier run's ``last.ckpt`` and names a rerun's ``last-v1.ckpt``: a command given
    ``last.ckpt`` would silently use the older run.
    """
    path = Path(path)
    if not re.fullmatch(r"last(-v\d+)?", path.stem) or path.suffix != ".ckpt" or not path.is_file():
        return ""
    newest = find_last_checkpoint([path.parent])
    if newest is None or Path(newest).resolve() == path.resolve():
        return ""
    step = checkpoint_global_step(newest)
    at = f" (step {step})" if step is not None else ""
    return f"; note: a later run wrote {newest}{at}, pass that file to use it"


def _unsafe_global(message: str) -> str:
    for line in message.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")[:160]
    return "an unsupported global"


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Swap Lightning's plain ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO` (the one place it is installed).

    A checkpoint IO chosen by the user (``Trainer(plugins=[...])`` or a strategy argument) is kept.
    """
    strategy: Strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
