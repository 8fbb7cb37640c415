"""A fit's outputs: checked before training, and no trained output replaced by the output of a fit that trained none.

* :func:`count_optimizer_steps` / :func:`keep_existing_output`: ``LoRA`` and ``RunSummary`` keep an existing adapter
  or ``summary.json`` when the fit trained no optimizer step.
* :func:`refuse_untrained_export`: a fit that trains no step (``max_steps=0``, a finished run resumed) is refused
  before anything is built when an adapter is already in LoRA's ``export_dir``.
* :func:`resolve_resume_last`: what ``ckpt_path="last"`` resumes from (a cut-off save refused, nothing: step 0).
* :func:`check_export_dir`: an adapter folder must be creatable and writable, and so its parent.

The run's folder lock is :mod:`lightning_qlora.callbacks.run_lock`; ``lightning-qlora fit`` runs these checks with it
(:func:`lightning_qlora.cli.fit_checks.check_fit_outputs`).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_qlora.lora.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from lightning_qlora.plugins.checkpoint_io import checkpoint_global_step, find_last_checkpoint, remove_cut_off_saves
from lightning_qlora.utils.atomic import check_writable

__all__ = [
    "check_export_dir",
    "count_optimizer_steps",
    "existing_adapter",
    "keep_existing_output",
    "optimizer_steps_this_fit",
    "refuse_untrained_export",
    "resolve_resume_last",
]


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
