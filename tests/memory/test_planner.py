"""The memory planner against bitsandbytes' storage, real optimizer state and measured activation peaks on CPU."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import tiny_llama_config

from lightning_qlora.lora.layer import LoRAConfig, inject_lora, mark_only_lora_trainable
from lightning_qlora.memory.footprint import measure_footprint
from lightning_qlora.memory.planner import plan_memory
from lightning_qlora.memory.tracker import LiveTensorTracker, tensor_bytes
from lightning_qlora.models.checkpointing import enable_gradient_checkpointing
from lightning_qlora.models.losses import causal_lm_loss
from lightning_qlora.models.sources import ModelSourceError, load_causal_lm
from lightning_qlora.optim.paged import build_optimizer, optimizer_state_bytes
from lightning_qlora.quantization.nf4 import QuantizationConfig

GIB = 2**30
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)  # fmt: skip
LLAMA_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)  # fmt: skip


def _random_model(tmp_path, lora: LoRAConfig, checkpointing: bool, **arch):
    config = tiny_llama_config(**arch)
    config.save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, QuantizationConfig(), init="random")
    inject_lora(model, lora)
    mark_only_lora_trainable(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return config, model.train()


def _step(model, optimizer, ids, chunk: int | None, dtype: torch.dtype = torch.bfloat16) -> None:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = causal_lm_loss(model, ids, ids, None, chunk) if chunk else model(input_ids=ids, labels=ids).loss
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "paged_lion_8bit"])
def test_parameter_adapter_and_optimizer_bytes_are_exact(tmp_path, optimizer):
    lora = LoRAConfig(r=8)
    config, model = _random_model(tmp_path, lora, False, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    opt = build_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], paged=False, lr=1e-4)
    _step(model, opt, torch.randint(4, 512, (1, 16)), None)
    plan = plan_memory(config, 1, 16, lora=lora, optimizer=optimizer, device_type="cpu")
    footprint = measure_footprint(model)
    assert plan.quantized_params == footprint.quantized_params
    assert plan.quantized_weights == footprint.quantized_bytes
    assert plan.unquantized_weights == footprint.unquantized_bytes
    assert (plan.adapter_params, plan.adapters) == (footprint.adapter_params, footprint.adapter_bytes)
    states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert plan.optimizer_states == tensor_bytes(states)  # the 8-bit quantization maps are shared: counted once
    assert plan.optimizer_states <= optimizer_state_bytes(opt)
    assert plan.paged_optimizer_states == 0  # CPU: nothing is paged


def test_moe_experts_are_planned_as_4bit_weights_with_adapters(tmp_path):
    from transformers import AutoConfig

    from lightning_qlora.lora.experts import inject_expert_lora

    config = AutoConfig.for_model(
        "mixtral", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    lora = LoRAConfig(r=4)
    model = load_causal_lm(tmp_path, QuantizationConfig(), init="random")
    inject_lora(model, lora)
    assert len(inject_expert_lora(model, lora)) == 4  # two layers, gate_up and down stacks
    mark_only_lora_trainable(model)
    footprint = measure_footprint(model)
    plan = plan_memory(config, 1, 16, lora=lora, device_type="cpu")
    assert footprint.matmul_share_4bit > 0.99  # only the routers (4x64 each) stay full precision
    assert plan.quantized_params == footprint.quantized_params
    assert plan.quantized_weights == footprint.quantized_bytes
    assert plan.unquantized_weights == footprint.unquantized_bytes
    assert (plan.adapter_params, plan.adapters) == (footprint.adapter_params, footprint.adapter_bytes)
    assert plan.settings["unquantized"].split(", ")[:2] == ["embeddings", "head"]
    assert "routers" in plan.settings["unquantized"]


@pytest.mark.parametrize(
    ("batch", "seq", "checkpointing", "chunk", "dropout"),
    [(2, 64, True, None, 0.1), (2, 64, False, None, 0.1), (1, 128, True, 64, 0.0)],
)
def test_activation_peak_within_15_percent_of_live_tensor_bytes(tmp_path, batch, seq, checkpointing, chunk, dropout):
    lora = LoRAConfig(r=16, dropout=dropout)
    arch = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1024)  # fmt: skip
    config, model = _random_model(tmp_path, lora, checkpointing, **arch)
    opt = build_optimizer("adamw_32bit", [p for p in model.parameters() if p.requires_grad], paged=False, lr=1e-4)
    ids = torch.randint(4, 1024, (batch, seq), generator=torch.Generator().manual_seed(0))
    _step(model, opt, ids, chunk)  # the first step allocates the optimizer state: measure the second
    gc.collect()
    with LiveTensorTracker() as tracker:
        _step(model, opt, ids, chunk)
    plan = plan_memory(config, batch, seq, lora=lora, optimizer="adamw_32bit", gradient_checkpointing=checkpointing,
                       loss_chunk_size=chunk, device_type="cpu")  # fmt: skip
    assert 0.85 <= plan.step_bytes / tracker.peak <= 1.15, (plan.step_bytes, tracker.peak, plan.settings["phases"])


@pytest.mark.parametrize(
    ("arch", "checkpointing", "dtype"),
    [("mixtral", False, torch.bfloat16), ("qwen3_moe", True, torch.float32), ("qwen2_moe", False, torch.float32),
     ("gpt_oss", True, torch.float32), ("llama4_text", False, torch.float32)],
)  # fmt: skip
def test_moe_training_peak_within_15_percent_of_live_tensor_bytes(tmp_path, arch, checkpointing, dtype):
    """Routing, each routed token's expert pass, shared experts and the experts' adapters, against a measured step."""
    from architecture_worker import tiny_config

    from lightning_qlora.lora.experts import inject_expert_lora

    config = tiny_config(arch)
    for key, value in dict(hidden_size=128, intermediate_size=256, head_dim=32, moe_intermediate_size=128,
                           shared_expert_intermediate_size=256, intermediate_size_mlp=256).items():  # fmt: skip
        if hasattr(config, key):
            setattr(config, key, value)
    config.save_pretrained(tmp_path)
    lora, quantization = LoRAConfig(r=16, dropout=0.1), QuantizationConfig(compute_dtype=dtype)
    model = load_causal_lm(tmp_path, quantization, init="random", dtype=dtype)
    inject_lora(model, lora)
    assert inject_expert_lora(model, lora)
    mark_only_lora_trainable(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    opt = build_optimizer("adamw_32bit", [p for p in model.parameters() if p.requires_grad], paged=False, lr=1e-4)
    ids = torch.randint(4, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    _step(model, opt, ids, None, dtype)
    gc.collect()
    with LiveTensorTracker() as tracker:
        _step(model, opt, ids, None, dtype)
    plan = plan_memory(config, 2, 64, lora=lora, quantization=quantization, dtype=dtype, optimizer="adamw_32bit",
                       gradient_checkpointing=checkpointing, loss_chunk_size=None, device_type="cpu")  # fmt: skip
    assert 0.85 <= plan.step_bytes / tracker.peak <= 1.15, (plan.step_bytes, tracker.peak, plan.settings["phases"])


def test_70b_architecture_counts_and_single_gpu_plan():
    plan = plan_memory(LLAMA_70B, batch_size=1, seq_len=2048)
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    assert plan.quantized_params == 80 * per_layer
    assert plan.bits_per_quantized_param == pytest.approx(4.127, abs=0.001)
    assert plan.unquantized_weights == (2 * 32000 * 8192 + 161 * 8192) * 2  # embeddings, head, 161 norms in bf16
    lora_params = 80 * 64 * (2 * 16384 + 2 * 9216 + 3 * 36864)
    assert plan.adapter_params == lora_params and plan.adapters == 4 * lora_params
    assert plan.optimizer_states == 8 * lora_params  # AdamW 32-bit: two fp32 states
    assert plan.paged_optimizer_states == 8 * (lora_params - 80 * 2 * 1024 * 64)  # k/v's B (65k values) unpaged
    assert plan.activations_without_checkpointing > 10 * plan.activations_with_checkpointing
    assert plan.resident < plan.peak < plan.total
    bf16 = plan.replan(lora=LoRAConfig(dtype="bf16"))
    assert bf16.adapters == plan.adapters // 2 and bf16.peak < plan.peak


def test_fsdp_divides_weights_states_and_ddp_keeps_replicas():
    one = plan_memory(LLAMA_7B, 1, 1024)
    fsdp = plan_memory(LLAMA_7B, 1, 1024, devices=8, sharding="fsdp")
    ddp = plan_memory(LLAMA_7B, 1, 1024, devices=8, sharding="ddp")
    assert fsdp.quantized_weights == one.quantized_weights // 8
    assert fsdp.optimizer_states == one.optimizer_states // 8 and fsdp.gradients == one.gradients // 8
    assert fsdp.activations_with_checkpointing == one.activations_with_checkpointing
    assert ddp.quantized_weights == one.quantized_weights and ddp.peak > one.peak  # gradient buckets
    assert fsdp.peak < one.peak


def test_advice_and_table():
    plan = plan_memory(LLAMA_7B, batch_size=16, seq_len=512, gradient_checkpointing=False)
    assert plan.advice(plan.peak) == []
    advice = plan.advice(12 * GIB)
    assert any("gradient checkpointing" in line for line in advice)
    assert any(line.startswith("batch 16 -> ") for line in advice)
    table = plan.format_table(measured_peak=plan.peak)
    for label in ("4-bit base weights", "LoRA adapters", "optimizer states", "activations, checkpointing on",
                  "predicted peak", "with paged states", "predicted / measured = 1.000"):  # fmt: skip
        assert label in table


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"batch_size": 0}, "must all be >= 1"),
        ({"sharding": "zero3"}, "use 'ddp' or 'fsdp'"),
        ({"optimizer": "adamw_16bit"}, "unknown optimizer"),
        ({"model": {"hidden_size": 64}}, "has no 'model_type'"),
        ({"model": "/no/such/config.json"}, "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(kwargs, fragment):
    arguments = {"model": LLAMA_7B, **kwargs}
    with pytest.raises((ValueError, ModelSourceError)) as err:
        plan_memory(**arguments)
    assert fragment in str(err.value) and "\n" not in str(err.value)
