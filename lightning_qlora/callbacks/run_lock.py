"""One run per output folder: the lock a run holds on its ``default_root_dir`` while it writes there.

:class:`RunDirLock` (and the :class:`RunLock` callback around it): ``<default_root_dir>/.lightning_qlora.lock`` holds
the pid and host of the run writing there; a second run into the folder stops before touching anything. The file is
created with ``O_CREAT | O_EXCL`` and removed when the run ends (also on errors, and at interpreter exit); a lock left
by a run that died on this host (its pid is gone, or now belongs to another process) is replaced.

The checks of a fit's outputs (writable folders, no trained adapter replaced by an untrained one) are in
:mod:`lightning_qlora.callbacks.fit_outputs`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_qlora.utils.atomic import (
    DiskFullError,
    OutputNotWritableError,
    check_writable,
    is_disk_full,
    not_writable_message,
    pid_alive,
)

__all__ = [
    "LOCK_NAME",
    "OutputNotWritableError",
    "RunDirLock",
    "RunDirLockedError",
    "RunLock",
    "check_writable",
]

LOCK_NAME = ".lightning_qlora.lock"
_UNWRITTEN_LOCK_GRACE_S = 30.0  # a lock file still empty after this long was left by a run killed while creating it
_HELD: dict[str, int] = {}  # lock files this process holds -> how many holders (the CLI and a RunLock callback)


class RunDirLockedError(ValueError):
    """Another live run holds the output folder's lock."""


class RunDirLock:
    """The lock of one run's output folder (``<folder>/.lightning_qlora.lock``); also a context manager.

    Re-entrant within a process (the CLI's lock and a :class:`RunLock` callback on the same folder do not collide).

    Args:
        folder: the run's ``default_root_dir`` (or a checkpoint ``dirpath``).
        option: the setting that names the folder, for messages (``--trainer.default_root_dir``).
        beside: lock a folder that is replaced as a whole (an adapter's ``export_dir``) with a file next to it,
            ``.<name>.lightning_qlora.lock``, rather than one inside it.
    """

    def __init__(
        self, folder: str | os.PathLike, option: str = "--trainer.default_root_dir", beside: bool = False
    ) -> None:
        self.target = Path(folder).expanduser().absolute()
        self.folder = self.target.parent if beside else self.target
        self.path = self.folder / (f".{self.target.name}{LOCK_NAME}" if beside else LOCK_NAME)
        self.option = option
        self.held = False

    def acquire(self) -> RunDirLock:
        """Take the lock, replacing a stale one (one info line).

        Returns:
            This lock.

        Raises:
            RunDirLockedError: if a live run (or a run on another host, which cannot be checked) holds it.
            OutputNotWritableError: if the folder cannot be created or written.
        """
        key = str(self.path)
        if self.held:
            return self
        if _HELD.get(key):
            _HELD[key] += 1
            self.held = True
            return self
        label = self.option.removeprefix("--trainer.")
        if self.folder == self.target:
            check_writable(self.folder, label, probe=False)
        else:  # a lock beside the target: its parent must exist; the target is what the message names
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputNotWritableError(not_writable_message(self.target, label, err)) from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None or _is_alive(holder):
                    raise RunDirLockedError(_locked_message(self.target, self.path, holder, self.option)) from None
                if _remove_if_unchanged(self.path, holder):
                    rank_zero_info(
                        f"RunLock: replaced the stale lock {self.path} of a run that is gone (pid {holder.get('pid')})"
                    )
                continue
            except OSError as err:
                raise OutputNotWritableError(not_writable_message(self.target, label, err)) from None
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(_me(), handle)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as err:  # a full disk, say: no empty lock left behind to refuse the next run
                self.path.unlink(missing_ok=True)
                if is_disk_full(err):
                    raise DiskFullError(self.path) from err
                raise
            _HELD[key] = 1
            self.held = True
            return self
        raise RunDirLockedError(_locked_message(self.target, self.path, _read_holder(self.path), self.option))

    def release(self) -> None:
        """Give the lock up; the file is removed when the last holder in this process lets go (if still ours)."""
        if not self.held:
            return
        self.held = False
        key = str(self.path)
        if _HELD.get(key, 0) > 1:
            _HELD[key] -= 1
            return
        _HELD.pop(key, None)
        _remove_own(self.path)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(Callback):
    """Hold :class:`RunDirLock` on the Trainer's ``default_root_dir`` (or ``folder``) for the length of each fit.

    ``lightning-qlora fit`` takes this lock by itself; add the callback to runs started from Python. Only global
    rank 0 locks.

    Args:
        folder: the folder to lock (default: ``trainer.default_root_dir``).

    Raises:
        RunDirLockedError: at fit setup, if another live run holds the folder.
    """

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self._lock: RunDirLock | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self._lock = RunDirLock(self.folder or trainer.default_root_dir).acquire()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _me() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.time(), "pid_start": _pid_start(pid)}


def _pid_start(pid: int) -> str | None:
    """When ``pid`` started (Linux ``/proc/<pid>/stat`` field 22), to tell a reused pid from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's content; ``{}`` for a stale unreadable one; ``None`` while it may still be being written."""
    for _ in range(10):
        try:
            holder = json.loads(path.read_text(encoding="utf-8") or "null")
        except FileNotFoundError:
            return {"gone": True}
        except (OSError, ValueError, UnicodeDecodeError):
            holder = None
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
            return holder
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > _UNWRITTEN_LOCK_GRACE_S:
            return {}
    return None


def _is_alive(holder: dict[str, Any]) -> bool:
    if holder.get("gone") or "pid" not in holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another host's processes
    pid = int(holder["pid"])
    if not pid_alive(pid):
        return False
    started = holder.get("pid_start")
    return started is None or _pid_start(pid) in (None, started)


def _remove_if_unchanged(path: Path, holder: dict[str, Any]) -> bool:
    """Remove a stale lock unless another run replaced it meanwhile (moved aside first, then compared)."""
    if holder.get("gone"):
        return False
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read_holder(aside)
    if moved != holder:  # another run's fresh lock: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)
    return moved == holder


def _remove_own(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        _HELD.pop(key, None)
        _remove_own(Path(key))


def _locked_message(folder: Path, path: Path, holder: dict[str, Any] | None, option: str) -> str:
    if not holder:
        who = "a run that is starting"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        who = f"pid {holder.get('pid')} on {holder.get('host')}, started {since}"
    other_host = bool(holder) and holder.get("host") != socket.gethostname()
    gone = f"; if that run is gone, delete {path}" if other_host or not holder else ""
    return f"{folder} is in use by another run ({who}); wait for it to finish, or pass another {option}{gone}"
