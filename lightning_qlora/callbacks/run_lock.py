"""One run per output folder, outputs checked before training, and no trained output replaced by an untrained one.

* :class:`RunDirLock` (and the :class:`RunLock` callback around it): ``<default_root_dir>/.lightning_qlora.lock``
  holds the pid and host of the run writing there; a second run into the folder stops before touching anything. The
  file is created with ``O_CREAT | O_EXCL`` and removed when the run ends (also on errors, and at interpreter exit);
  a lock left by a run that died on this host (its pid is gone, or now belongs to another process) is replaced.
* :func:`check_writable`: an output folder must be creatable and writable before any step is trained.
* :func:`count_optimizer_steps` / :func:`keep_existing_output`: ``LoRA`` and ``RunSummary`` keep an existing adapter
  or ``summary.json`` when the fit trained no optimizer step (``max_steps=0``, a finished run resumed).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_qlora.lora.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from lightning_qlora.plugins.checkpoint_io import checkpoint_global_step, find_last_checkpoint, remove_cut_off_saves
from lightning_qlora.utils.atomic import OutputNotWritableError, check_writable, not_writable_message, pid_alive

__all__ = [
    "LOCK_NAME",
    "OutputNotWritableError",
    "RunDirLock",
    "RunDirLockedError",
    "RunLock",
    "check_export_dir",
    "check_writable",
    "count_optimizer_steps",
    "existing_adapter",
    "keep_existing_output",
    "optimizer_steps_this_fit",
    "refuse_untrained_export",
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
        folder: the run's ``default_root_dir``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.path = self.folder / LOCK_NAME
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
        check_writable(self.folder, "default_root_dir", probe=False)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None or _is_alive(holder):
                    raise RunDirLockedError(_locked_message(self.folder, self.path, holder)) from None
                if _remove_if_unchanged(self.path, holder):
                    rank_zero_info(
                        f"RunLock: replaced the stale lock {self.path} of a run that is gone (pid {holder.get('pid')})"
                    )
                continue
            except OSError as err:
                raise OutputNotWritableError(not_writable_message(self.folder, "default_root_dir", err)) from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(_me(), handle)
                handle.flush()
                os.fsync(handle.fileno())
            _HELD[key] = 1
            self.held = True
            return self
        raise RunDirLockedError(_locked_message(self.folder, self.path, _read_holder(self.path)))

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


def count_optimizer_steps(trainer: pl.Trainer) -> None:
    """Start counting the optimizer steps of this fit (call at setup); read with :func:`optimizer_steps_this_fit`.

    Every ``torch.optim.Optimizer.step`` in the process counts while the fit runs.

    Args:
        trainer: the Trainer of the fit.
    """
    old = getattr(trainer, "_lightning_qlora_steps", None)
    if old is not None:
        old.stop()
    counter = _StepCounter()
    if counter.handle is not None:
        weakref.finalize(trainer, counter.stop)
    trainer._lightning_qlora_steps = counter  # type: ignore[attr-defined]


def optimizer_steps_this_fit(trainer: pl.Trainer, stop: bool = False) -> int | None:
    """Optimizer steps since :func:`count_optimizer_steps` (``None`` if nobody counted).

    Args:
        trainer: the Trainer of the fit.
        stop: stop counting (the count is kept).
    """
    counter = getattr(trainer, "_lightning_qlora_steps", None)
    if counter is None or counter.handle is None and not counter.stopped:
        return None
    if stop:
        counter.stop()
    return counter.steps


def keep_existing_output(
    trainer: pl.Trainer, target: Path, what: str, overwrite: bool, trained: int | None = None
) -> bool:
    """Whether to keep ``target`` rather than replace it with the output of a fit that trained no step.

    Warns once (one line) when it is kept.

    Args:
        trainer: the Trainer of the fit.
        target: the existing output (a file, or a folder's main file).
        what: its name in the warning.
        overwrite: replace it anyway.
        trained: optimizer steps of this fit, if the caller knows (else :func:`optimizer_steps_this_fit`).
    """
    steps = optimizer_steps_this_fit(trainer) if trained is None else trained
    if overwrite or steps is None or steps > 0 or not target.exists():
        return False
    rank_zero_warn(
        f"this fit trained 0 optimizer steps (global_step {trainer.global_step}); kept the existing {what} "
        f"{target} instead of replacing it with an untrained one (lightning-qlora fit --overwrite true replaces it)"
    )
    return True


def existing_adapter(folder: str | os.PathLike) -> Path | None:
    """The PEFT adapter file in ``folder`` (weights first, else its config), or ``None`` if it holds none.

    Args:
        folder: an adapter folder (``LoRA(export_dir=...)``).
    """
    for name in (SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME):
        path = Path(folder).expanduser() / name
        if path.is_file():
            return path
    return None


class _StepCounter:
    def __init__(self) -> None:
        self.steps = 0
        self.stopped = False
        try:
            from torch.optim.optimizer import register_optimizer_step_post_hook
        except ImportError:  # an older torch: nobody counts, outputs are written as before
            self.handle = None
        else:
            self.handle = register_optimizer_step_post_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.steps += 1

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.stopped = True


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


def _locked_message(folder: Path, path: Path, holder: dict[str, Any] | None) -> str:
    if not holder:
        who = "a run that is starting"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        who = f"pid {holder.get('pid')} on {holder.get('host')}, started {since}"
    other_host = bool(holder) and holder.get("host") != socket.gethostname()
    gone = f"; if that run is gone, delete {path}" if other_host or not holder else ""
    return (
        f"{folder} is in use by another run ({who}); wait for it to finish, or pass another "
        f"--trainer.default_root_dir{gone}"
    )


def refuse_untrained_export(max_steps: int, ckpt_path: str | None, exports: list[Path], ckpt_dirs: list[Path]) -> None:
    """Refuse a fit that trains no step (``max_steps=0``, or resuming at ``max_steps``) while an adapter is there.

    Such a run would replace a trained adapter with an untrained one. Reads only; writes nothing.

    Args:
        max_steps: the Trainer's ``max_steps`` (-1: no limit).
        ckpt_path: the fit's ``ckpt_path`` (a file, ``"last"``, or None; ``"best"`` and the like are not checked).
        exports: the LoRA export folders.
        ckpt_dirs: the checkpoint folders (where ``ckpt_path="last"`` looks).

    Raises:
        ValueError: naming the folder, and saying to pass ``--overwrite true`` or choose another folder.
    """
    held = [folder for folder in exports if existing_adapter(folder) is not None]
    if not held or max_steps < 0:
        return
    if max_steps == 0:
        reason = "--trainer.max_steps=0 trains no step"
    else:
        resumed = find_last_checkpoint(ckpt_dirs) if ckpt_path == "last" else ckpt_path
        step = checkpoint_global_step(resumed) if resumed else None
        if step is None or step < max_steps:
            return
        reason = f"checkpoint {resumed} is already at step {step} (max_steps={max_steps}), so this run trains no step"
    raise ValueError(
        f"{reason} and would replace the adapter in {held[0]} with an untrained one; pass --overwrite true to "
        "replace it anyway, choose another folder (LoRA export_dir), or raise --trainer.max_steps"
    )


def resolve_resume_last(ckpt_dirs: list[Path]) -> str | None:
    """What ``ckpt_path="last"`` resumes from, said in our words when there is nothing to resume.

    Lightning treats a missing ``last`` as "start from step 0" (set and forget before a first run), with a hint
    to set ``save_last=True`` even when it is set. Here: the newest ``last*.ckpt`` in ``ckpt_dirs``; if there is
    none but a killed run cut off its save, the partial file is removed and the run refused (the user decides);
    if there is nothing at all, one warning line and ``None`` (start from step 0).

    Args:
        ckpt_dirs: the checkpoint folders of the run's checkpoint callbacks.

    Raises:
        ValueError: no complete checkpoint, only a save a killed run cut off.
    """
    found = find_last_checkpoint(ckpt_dirs)
    if found is not None:
        return found
    where = ", ".join(str(f) for f in ckpt_dirs)
    cut_off = [tmp for folder in ckpt_dirs for tmp in remove_cut_off_saves(folder)]
    if cut_off:
        raise ValueError(
            f"--ckpt_path last: no complete checkpoint in {where}: the only save there was cut off by a killed run "
            f"(removed its partial file {cut_off[0].name}); run without --ckpt_path to start from step 0"
        )
    rank_zero_info(f"lightning-qlora: --ckpt_path last: no checkpoint in {where} yet; starting from step 0")
    return None


def check_export_dir(export: Path) -> None:
    """An adapter folder is replaced through a temp sibling: it must be creatable and writable, and so its parent.

    Args:
        export: ``LoRA(export_dir=...)``.

    Raises:
        OutputNotWritableError: naming the folder that cannot be written.
    """
    created = not export.exists()
    check_writable(export, "LoRA export_dir")
    if created:
        with contextlib.suppress(OSError):
            export.rmdir()  # leave no empty adapter folder behind a run that fails before exporting
    else:
        check_writable(export.parent, f"LoRA export_dir {export} is replaced through its folder;")
