"""The planner's preference terms against measured live tensor bytes: one 4-bit base, the reference pass for free."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import tiny_llama_config

from lightning_qlora.lora.layer import LoRAConfig, adapters_disabled, inject_lora, mark_only_lora_trainable
from lightning_qlora.memory.planner import plan_memory
from lightning_qlora.memory.tracker import LiveTensorTracker
from lightning_qlora.models.checkpointing import enable_gradient_checkpointing
from lightning_qlora.models.losses import causal_lm_loss
from lightning_qlora.models.preference import model_sequence_logps
from lightning_qlora.models.preference_losses import preference_loss
from lightning_qlora.models.sources import load_causal_lm
from lightning_qlora.quantization.nf4 import QuantizationConfig

ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1024)  # fmt: skip
LORA = LoRAConfig(r=16, dropout=0.1)
QUANT = QuantizationConfig(compute_dtype=torch.float32)  # fp32: CPUs without native bf16 run it 40x faster
PLAN = dict(lora=LORA, quantization=QUANT, dtype=torch.float32, optimizer="adamw_32bit", device_type="cpu")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("planner_preference")
    tiny_llama_config(**ARCH).save_pretrained(path)
    return path


def _model(path, checkpointing: bool):
    model = load_causal_lm(path, QUANT, init="random", dtype=torch.float32)
    inject_lora(model, LORA)
    mark_only_lora_trainable(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def _step(model, ids, chunk, method: str | None) -> None:
    """Forward and backward of one step: SFT (``method=None``) or a preference step as PreferenceLM runs it."""
    if method is None:
        loss = causal_lm_loss(model, ids, ids, None, chunk)
    else:
        reference = None
        if method != "orpo":
            with torch.no_grad(), adapters_disabled(model):
                reference = model_sequence_logps(model, ids, ids, None, chunk)[0]
        logps, tokens = model_sequence_logps(model, ids, ids, None, chunk)
        loss = preference_loss(method, logps, tokens, reference).loss
    loss.backward()


def _measured_peak(model, ids, chunk, method) -> int:
    """Live tensor bytes at the peak of one step (gradients included; optimizer states are not step bytes)."""
    gc.collect()
    with LiveTensorTracker() as tracker:
        _step(model, ids, chunk, method)
    model.zero_grad(set_to_none=True)
    return tracker.peak


def test_one_base_in_memory_and_the_dpo_step_peak_within_15_percent(config_dir):
    """A second (reference) model would add its weights to the plan and to the step's live bytes; neither grows."""
    model = _model(config_dir, checkpointing=True)
    ids = torch.randint(4, 1024, (4, 64), generator=torch.Generator().manual_seed(0))  # 2 pairs = 4 sequences
    sft, dpo = (_measured_peak(model, ids, 64, method) for method in (None, "dpo"))
    assert dpo <= 1.01 * sft, (dpo, sft)
    gc.collect()
    with LiveTensorTracker() as tracker, torch.no_grad(), adapters_disabled(model):
        model_sequence_logps(model, ids, ids, None, 64)
    plain = plan_memory(config_dir, 4, 64, loss_chunk_size=64, **PLAN)
    planned = plan_memory(config_dir, 4, 64, loss_chunk_size=64, preference="dpo", **PLAN)
    for field in ("quantized_weights", "unquantized_weights", "adapters", "optimizer_states", "resident"):
        assert getattr(planned, field) == getattr(plain, field), field
    assert planned.peak == plain.peak  # the reference forward ends before the policy's starts, and is smaller
    assert 0.85 <= planned.step_bytes / dpo <= 1.15, (planned.step_bytes, dpo, planned.settings["phases"])
    reference = planned.settings["phases"]["reference forward"]
    assert 0.85 <= reference / tracker.peak <= 1.15, (reference, tracker.peak)


def test_orpo_step_with_the_models_own_logits_within_15_percent(config_dir):
    """No reference pass; the whole batch's fp32 logits (``loss_chunk_size=None``) kept for backward."""
    ids = torch.randint(4, 1024, (2, 128), generator=torch.Generator().manual_seed(1))
    peak = _measured_peak(_model(config_dir, checkpointing=True), ids, None, "orpo")
    plan = plan_memory(config_dir, 2, 128, loss_chunk_size=None, preference="orpo", **PLAN)
    assert 0.85 <= plan.step_bytes / peak <= 1.15, (plan.step_bytes, peak, plan.settings["phases"])
    assert "reference forward" not in plan.settings["phases"]


def test_unknown_preference_method_is_a_one_line_error(config_dir):
    with pytest.raises(ValueError, match="not a preference method") as err:
        plan_memory(config_dir, 2, 16, preference="kto")
    assert "\n" not in str(err.value)
