"""NonFiniteGuard (stop / skip with a pointer to the data rows), finite-only writes, and out-of-memory advice."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import quiet_trainer

from lightning_qlora import CausalLM, InstructionDataModule, LoRA, PreferenceLM
from lightning_qlora.callbacks.checkpoint import ResumableCheckpoint
from lightning_qlora.callbacks.guards import NonFiniteGuard, OutOfMemoryAdvice, oom_advice
from lightning_qlora.cli.main import main
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules
from lightning_qlora.lora.peft_format import export_peft
from lightning_qlora.utils.finite import NonFiniteError, check_finite_tensors

POISON_LINE = 9  # the data file line whose row yields a NaN loss


class PoisonedLM(CausalLM):
    """A CausalLM whose loss is NaN for batches holding the row read from data line ``POISON_LINE``."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        wheres = self.trainer.datamodule.describe_rows(batch["row_index"].tolist())
        if any(w.endswith(f"line {POISON_LINE}") for w in wheres):
            loss = loss * float("nan")
        return loss


class _Bare:
    """A trainer stand-in with no callbacks, optimizers or model the planner knows."""

    callbacks: list = []
    optimizers: list = []
    accumulate_grad_batches = 1


class OutOfMemoryLM(CausalLM):
    """Raises CUDA's out-of-memory error at the third step, as a too-large batch would."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
        return super().training_step(batch, batch_idx)


@pytest.fixture()
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}."}) + "\n" for i in range(20)
        )
    )
    return path


def fit(model_cls, tiny_llama_dir, rows, tmp_path, guard, max_steps=6, callbacks=(), packing=False):
    trainer = quiet_trainer(
        tmp_path, [LoRA(r=8, dropout=0.0, export_dir=str(tmp_path / "adapter")), guard, *callbacks], max_steps
    )
    model = model_cls(model=str(tiny_llama_dir), lr=5e-3)
    data = InstructionDataModule(
        str(rows), batch_size=2, max_length=64, val_split=2, group_by_length=False, packing=packing
    )
    trainer.fit(model, datamodule=data)
    return trainer, model


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_stop_names_step_batch_and_data_rows_and_writes_nothing(tiny_llama_dir, rows, tmp_path, packing):
    good = tmp_path / "adapter"  # a good adapter and checkpoint from an earlier run are never replaced
    good.mkdir()
    (good / "adapter_model.safetensors").write_bytes(b"good adapter")
    checkpoints = tmp_path / "ckpts"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"good checkpoint")
    before = digest(good), digest(checkpoints)
    saver = ResumableCheckpoint(dirpath=checkpoints, every_n_train_steps=100)
    with pytest.raises(NonFiniteError) as err:
        fit(PoisonedLM, tiny_llama_dir, rows, tmp_path, NonFiniteGuard(), 20, [saver], packing)
    message = str(err.value)
    assert "\n" not in message
    assert "non-finite loss (nan) at step" in message and "(epoch 0, batch " in message
    assert f"rows.jsonl line {POISON_LINE}" in message
    assert (digest(good), digest(checkpoints)) == before


def test_skip_leaves_the_adapter_untouched_for_that_step_and_goes_on(tiny_llama_dir, rows, tmp_path):
    guard = NonFiniteGuard(action="skip")
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    with pytest.warns(UserWarning, match="skipped the update of step"):
        trainer, model = fit(PoisonedLM, tiny_llama_dir, rows, tmp_path, guard, max_steps=9, callbacks=[Snapshot()])
    assert trainer.global_step == 9 and len(guard.skipped_steps) == 1  # one epoch: the poisoned row comes once
    step = guard.skipped_steps[0]  # the update of that step left every adapter tensor as it was
    after, previous = snapshots[step], snapshots[step - 1] if step > 0 else None
    if previous is not None:
        assert all(torch.equal(after[n], previous[n]) for n in after)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    assert any(not torch.equal(snapshots[-1][n], snapshots[0][n]) for n in after)  # other steps trained
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_skip_stops_after_too_many_bad_updates_in_a_row(tiny_llama_dir, rows, tmp_path):
    class AlwaysNaN(CausalLM):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    with pytest.raises(NonFiniteError, match="3 updates in a row"), pytest.warns(UserWarning):
        fit(AlwaysNaN, tiny_llama_dir, rows, tmp_path, NonFiniteGuard(action="skip", max_consecutive_skips=2))


def test_non_finite_gradient_is_caught_before_the_optimizer_step(tiny_llama_dir, rows, tmp_path):
    class InfGrad(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 1:
                next(p for p in pl_module.parameters() if p.grad is not None).grad[0, 0] = float("inf")

    with pytest.raises(NonFiniteError, match=r"non-finite gradient of model\..*lora_A at step 1"):
        fit(CausalLM, tiny_llama_dir, rows, tmp_path, NonFiniteGuard(), callbacks=[InfGrad()])


@pytest.mark.parametrize("bad", [{"action": "retry"}, {"max_consecutive_skips": -1}])
def test_bad_guard_options_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="NonFiniteGuard") as err:
        NonFiniteGuard(**bad)
    assert "\n" not in str(err.value)


def test_a_nan_adapter_is_never_exported_over_a_good_one(base, tmp_path):
    config = LoRAConfig(r=8)
    inject_lora(base, config)
    export_peft(base, tmp_path / "adapter", config)
    before = digest(tmp_path / "adapter")
    _, layer = next(iter(lora_modules(base)))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to write the PEFT adapter .*lora_B.* NaN/inf"):
        export_peft(base, tmp_path / "adapter", config)
    assert digest(tmp_path / "adapter") == before
    check_finite_tensors({"ok": torch.ones(2), "ids": torch.tensor([1, 2])}, "fine")  # ints are not checked


def test_out_of_memory_gets_advice_as_a_note(tiny_llama_dir, rows, tmp_path):
    advice = OutOfMemoryAdvice()
    with pytest.raises(torch.OutOfMemoryError) as err:
        fit(OutOfMemoryLM, tiny_llama_dir, rows, tmp_path, NonFiniteGuard(), callbacks=[advice])
    assert advice.message is not None and "\n" not in advice.message
    assert advice.message.startswith("out of memory at step 2 (batch 2x")
    assert "(planned peak " in advice.message and "turn gradient checkpointing on" in advice.message
    assert "batch 2 -> 1 with accumulate_grad_batches=2: peak" in advice.message  # the planner's numbers
    plain = oom_advice(_Bare(), None, (2, 64))  # a model the planner does not know: advice from the settings
    assert plain[0].startswith("halve the micro-batch (batch_size=1)") and "paged_adamw_8bit" in plain[1]
    pairs = oom_advice(_Bare(), PreferenceLM(model=str(tiny_llama_dir)), (8, 64))  # 4 pairs: 8 rows
    assert pairs[0].startswith("halve the micro-batch (batch_size=2 pairs) and set trainer.accumulate_grad_batches=2")
    assert any(advice.message in note for note in getattr(err.value, "__notes__", [advice.message]))


def test_cli_prints_one_line_advice_on_out_of_memory(tiny_llama_dir, rows, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-qlora"])
    config = {
        "trainer": {
            "max_steps": 4, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "enable_checkpointing": False,
            "plugins": [{"class_path": "lightning_qlora.NF4Precision"}],
            "callbacks": [{"class_path": "lightning_qlora.LoRA", "init_args": {"r": 8}}],
        },
        "model": {"class_path": f"{__name__}.OutOfMemoryLM", "init_args": {"model": str(tiny_llama_dir)}},
        "data": {"class_path": "lightning_qlora.InstructionDataModule",
                 "init_args": {"path": str(rows), "max_length": 64, "batch_size": 4, "val_split": 2}},
    }  # fmt: skip
    (tmp_path / "oom.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tmp_path / "oom.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    lines = [line for line in err.splitlines() if line.startswith("lightning-qlora: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "out of memory at step 2 (batch 4x" in lines[0] and "batch 4 -> " in lines[0]


def test_lora_callback_makes_lightning_checkpoints_atomic_and_weights_only(tiny_mlp, tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lightning_qlora.plugins.checkpoint_io import AtomicCheckpointIO

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, max_steps=1)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    LoRA(r=8).setup(trainer, pl.LightningModule(), "fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.strategy.checkpoint_io.weights_only
