"""What ``lightning-qlora fit`` checks from its parsed config before anything is built, loaded or written.

:func:`check_fit_outputs` refuses a run that trains no step over an existing adapter, resolves ``--ckpt_path last``,
takes the ``RunDirLock`` of ``default_root_dir``, of each checkpoint ``dirpath`` and of each LoRA ``export_dir`` (kept
in :data:`CLI_LOCKS` until :func:`release_cli_locks`) and checks
that every output folder can be written: bad input ends in one line before the model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_qlora.callbacks.fit_outputs import check_export_dir, refuse_untrained_export, resolve_resume_last
from lightning_qlora.callbacks.run_lock import RunDirLock
from lightning_qlora.utils.atomic import check_writable

CLI_LOCKS: list[Any] = []
"""Run locks taken by ``fit`` in this process; :func:`release_cli_locks` releases them when the run ends."""


def check_fit_outputs(config: Any) -> list[Any] | None:
    """Check a ``fit``'s outputs from its parsed config before anything is built, loaded or written.

    In order: ``refuse_untrained_export`` (reads only); then, on rank 0 of a run, the ``RunDirLock`` of
    ``default_root_dir``, of each checkpoint ``dirpath`` and of each ``export_dir`` are taken, and that folder, each
    callback's ``dirpath`` (checkpoints) and ``export_dir`` (LoRA) must be creatable and writable
    (:mod:`lightning_qlora.callbacks.run_lock`, :mod:`lightning_qlora.callbacks.fit_outputs`).

    Args:
        config: the ``fit`` subcommand's config (``trainer``, ``ckpt_path``, ``overwrite``).

    Returns:
        The locks taken (release them when the run ends); ``None`` on another rank or for a remote folder.

    Raises:
        ValueError: a run that trains no step would replace an adapter (see ``refuse_untrained_export``).
        RunDirLockedError: another live run holds ``default_root_dir``, a checkpoint ``dirpath`` or an
            ``export_dir``.
        OutputNotWritableError: an output folder cannot be created or written.
    """
    trainer = _get(config, "trainer") or {}
    accumulate = _get(trainer, "accumulate_grad_batches")
    if accumulate is not None and (not isinstance(accumulate, int) or accumulate < 1):
        raise ValueError(
            f"--trainer.accumulate_grad_batches={accumulate!r}: must be a whole number >= 1 (1: no accumulation)"
        )
    callbacks = _get(trainer, "callbacks") or []
    inits = [_get(c, "init_args") or {} for c in (callbacks if isinstance(callbacks, list) else [callbacks])]
    exports = [Path(str(e)) for e in (_get(i, "export_dir") for i in inits) if e and _is_local(e)]
    ckpt_dirs = [Path(str(d)) for d in (_get(i, "dirpath") for i in inits) if d and _is_local(d)]
    if _get(config, "ckpt_path") == "last" and ckpt_dirs:
        config["ckpt_path"] = resolve_resume_last(ckpt_dirs)  # a file, or None: start from step 0
    if not _get(config, "overwrite"):
        max_steps = _get(trainer, "max_steps")
        refuse_untrained_export(-1 if max_steps is None else max_steps, _get(config, "ckpt_path"), exports, ckpt_dirs)
    root = _get(trainer, "default_root_dir") or os.getcwd()
    if not _is_local(root) or not _is_rank_zero():
        return None
    locks = [RunDirLock(root)]
    locks += [RunDirLock(folder, "checkpoint dirpath") for folder in ckpt_dirs]  # a recipe's own paths: two runs
    locks += [RunDirLock(export, "LoRA export_dir", beside=True) for export in exports]  # with other roots share them
    held = []
    try:
        for lock in locks:
            held.append(lock.acquire())
        check_writable(root, "default_root_dir")
        for folder in ckpt_dirs:
            check_writable(folder, "checkpoint dirpath")
        for export in exports:
            check_export_dir(export)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


def release_cli_locks() -> None:
    """Release the run locks :func:`check_fit_outputs` took in this process (when the run ends or is refused)."""
    while CLI_LOCKS:
        CLI_LOCKS.pop().release()


def _get(namespace: Any, key: str) -> Any:
    return namespace.get(key) if hasattr(namespace, "get") else getattr(namespace, key, None)


def _is_rank_zero() -> bool:
    """Not a process a launcher started for another rank (Lightning's DDP launcher, torchrun, SLURM, MPI)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


__all__ = ["CLI_LOCKS", "check_fit_outputs", "release_cli_locks"]
