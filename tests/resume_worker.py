"""A QLoRA fine-tune run as a real subprocess by tests/callbacks/test_resume.py, optionally killed with SIGKILL mid-run.

Usage: python tests/resume_worker.py SPEC.json

SPEC keys: root, model_dir, data, max_steps, resume (bool), kill ("none" | "forward:K" | "after_step:K" |
"save:K" | "write:K", K a global step), packing (bool), objective (absent: ``CausalLM`` on the instruction rows;
"dpo" | "ipo" | "orpo": ``PreferenceLM`` on pairs made from them, rejected = another row's answer). The final
adapter goes to <root>/adapter (PEFT format).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_qlora import (
    CausalLM,
    InstructionDataModule,
    LoRA,
    NF4Precision,
    PagedOptimizerStrategy,
    PreferenceDataModule,
    PreferenceLM,
)
from lightning_qlora.callbacks.checkpoint import ResumableCheckpoint
from lightning_qlora.callbacks.guards import NonFiniteGuard
from lightning_qlora.callbacks.resume import ExactResume


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Killer(pl.Callback):
    """SIGKILL this process at a chosen point of global step ``step``."""

    def __init__(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # mid gradient-accumulation window: the second micro-batch of the step
        if self.phase == "forward" and trainer.global_step == self.step and batch_idx % 2 == 1:
            die()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        # after the optimizer step, before ModelCheckpoint (next in the callback list) saves it
        if self.phase == "after_step" and trainer.global_step == self.step and (idx + 1) % 2 == 0:
            die()


def patch_saves(phase: str, step: int) -> None:
    """Kill inside the save of ``last.ckpt`` at global step ``step``: before the rename (``save``: the temp file is
    complete and fsynced) or halfway through writing its bytes (``write``)."""
    import lightning_qlora.plugins.checkpoint_io as cio

    original = cio.atomic_write_bytes
    state = {"step": -1}
    save_checkpoint = cio.AtomicCheckpointIO.save_checkpoint

    def save(self: Any, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        state["step"] = checkpoint.get("global_step", -1)
        save_checkpoint(self, checkpoint, path, storage_options)

    def write(path: Any, data: Any) -> None:
        if str(path).endswith("last.ckpt") and state["step"] == step:
            if phase == "write":  # a torn write: half the bytes in a temp file, then death
                with open(f"{path.parent}/.{path.name}{cio.TEMP_MARK}{os.getpid()}-torn", "wb") as handle:
                    handle.write(bytes(data)[: len(data) // 2])
                die()
            os.replace = lambda src, dst: die()  # temp file complete and fsynced, never renamed
        original(path, data)

    cio.AtomicCheckpointIO.save_checkpoint = save
    cio.atomic_write_bytes = write


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    if spec.get("resume") and not os.path.exists(f"{spec['root']}/checkpoints/last.ckpt"):
        sys.exit(f"no last.ckpt to resume from in {spec['root']}/checkpoints")
    phase, _, step = spec.get("kill", "none").partition(":")
    if phase in ("save", "write"):
        patch_saves(phase, int(step))
    pl.seed_everything(spec.get("seed", 7))
    torch.set_num_threads(1)
    root = spec["root"]
    callbacks: list[pl.Callback] = [
        LoRA(r=8, alpha=16, dropout=0.1, export_dir=f"{root}/adapter"),
        ExactResume(),
        NonFiniteGuard(),
    ]
    if phase in ("forward", "after_step"):
        callbacks.append(Killer(phase, int(step)))
    callbacks.append(ResumableCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=1))
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=spec["max_steps"],
        accumulate_grad_batches=2,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=0.3,
        plugins=[NF4Precision()],
        strategy=PagedOptimizerStrategy("paged_adamw_32bit"),
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    objective = spec.get("objective")
    data: InstructionDataModule
    if objective:  # DPO/IPO: each step also runs the reference forward (adapters off) before the policy's
        model = PreferenceLM(model=spec["model_dir"], method=objective, beta=0.5, dtype="fp32", lr=5e-3, warmup_steps=3)
        data = PreferenceDataModule(spec["data"], rejected_from="other_answer", batch_size=2, max_length=96,
                                    val_split=4, seed=11)  # fmt: skip
    else:
        model = CausalLM(model=spec["model_dir"], dtype="fp32", lr=5e-3, warmup_steps=3)
        packing = spec.get("packing", False)
        data = InstructionDataModule(spec["data"], batch_size=2, max_length=96, val_split=4, seed=11, packing=packing)
    trainer.fit(model, datamodule=data, ckpt_path="last" if spec.get("resume") else None)
    print(f"finished at step {trainer.global_step}", flush=True)
    print(f"val_history={json.dumps(model.val_history)}", flush=True)
    if objective:
        print(f"preference_history={json.dumps(model.preference_history)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
