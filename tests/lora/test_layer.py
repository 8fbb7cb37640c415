"""LoRA injection and math: targets, scaling, exact identity at step 0, float64 reference, freezing, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from conftest import NoLinear, TinyMLP, build_tiny_llama
from torch import nn

from lightning_qlora import LoRA
from lightning_qlora.lora.layer import (
    LoRAConfig,
    LoRALinear,
    find_lora_targets,
    inject_lora,
    lora_modules,
    lora_state_dict,
    mark_only_lora_trainable,
)
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.quantization.shells import quantize_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def short(names):
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def randomize_b(model, seed=1, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


# ----------------------------------------------------------------------------------------------------- targets
def test_all_linear_by_default_except_the_output_head():
    llama = build_tiny_llama()
    names = inject_lora(llama, LoRAConfig(r=4))
    assert len(names) == 14 and short(names) == sorted(ALL)
    assert type(llama.lm_head) is nn.Linear

    mlp = TinyMLP()
    assert inject_lora(mlp, LoRAConfig(r=4)) == ["fc1", "fc2"]
    assert type(mlp.output) is nn.Linear


def test_tied_head_is_left_out_of_all_linear():
    model = build_tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    targets = find_lora_targets(model, LoRAConfig(r=4, head_modules=[]))  # no head names: the tie alone excludes it
    assert len(targets) == 14 and "lm_head" not in targets
    untied = build_tiny_llama()
    assert "lm_head" in find_lora_targets(untied, LoRAConfig(r=4, head_modules=[]))


@pytest.mark.parametrize(
    "target, exclude, expected",
    [
        (["q_proj", "v_proj"], [], {"q_proj": 2, "v_proj": 2}),
        (r".*\.mlp\.(up|down)_proj", [], {"up_proj": 2, "down_proj": 2}),
        (["model.layers.0.self_attn.q_proj"], [], {"q_proj": 1}),
        ("all-linear", ["o_proj", r"model\.layers\.1\..*"], {n: 1 for n in ALL if n != "o_proj"}),
        (["lm_head"], [], {"lm_head": 1}),  # the head only when asked for by name
    ],
)
def test_targets_by_name_regex_and_exclusions(target, exclude, expected):
    model = build_tiny_llama()
    names = inject_lora(model, LoRAConfig(r=4, target_modules=target, exclude_modules=exclude))
    counts: dict[str, int] = {}
    for name in names:
        counts[name.rsplit(".", 1)[-1]] = counts.get(name.rsplit(".", 1)[-1], 0) + 1
    assert counts == expected
    assert sum(1 for _ in lora_modules(model)) == len(names)


def test_injection_is_idempotent():
    model = build_tiny_llama()
    first = inject_lora(model, LoRAConfig(r=4))
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert inject_lora(model, LoRAConfig(r=4)) == []
    assert sum(1 for _ in lora_modules(model)) == len(first)
    after = lora_state_dict(model)
    assert adapters.keys() == after.keys() and all(torch.equal(adapters[k], after[k]) for k in adapters)


# -------------------------------------------------------------------------------------------------------- math
def test_scaling_plain_and_rslora():
    assert LoRAConfig(r=16, alpha=32).scaling == 2.0
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0
    layer = LoRALinear(nn.Linear(64, 64), r=16, alpha=32, use_rslora=True)
    assert layer.scaling == 32 / math.sqrt(16)
    model = TinyMLP()
    inject_lora(model, LoRAConfig(r=4, alpha=8, use_rslora=True))
    assert all(m.scaling == 4.0 for _, m in lora_modules(model))


@pytest.mark.parametrize("quantized", [False, True], ids=["plain-base", "4bit-base"])
def test_output_is_exactly_unchanged_at_step_zero(quantized):
    torch.manual_seed(0)
    model = build_tiny_llama().eval()
    if quantized:
        quantize_model(model)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before_autocast = model(ids).logits
    inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.1))
    model.eval()
    assert all(torch.count_nonzero(m.lora_A) > 0 for _, m in lora_modules(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(ids).logits, before_autocast)


def float64_reference(x, w0, bias, a, b, scaling):
    x, w0, a, b = x.double(), w0.double(), a.double(), b.double()
    out = x @ w0.T + scaling * (x @ a.T @ b.T)
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_a_float64_recompute_on_a_plain_base(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(64, 128)
    layer = LoRALinear(base, r=8, alpha=16, use_rslora=use_rslora)
    randomize_b(nn.ModuleList([layer]))
    scaling = 16 / math.sqrt(8) if use_rslora else 16 / 8
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        out = layer(x)
    expected = float64_reference(x, base.weight, base.bias, layer.lora_A, layer.lora_B, scaling)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    update = expected - float64_reference(x, base.weight, base.bias, layer.lora_A, torch.zeros_like(layer.lora_B), 1)
    assert update.abs().max() > 0.1  # the adapter contributes visibly
    torch.testing.assert_close(
        layer.delta_weight(torch.float64), scaling * layer.lora_B.double() @ layer.lora_A.double()
    )


def test_forward_matches_a_float64_recompute_on_a_4bit_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128))
    quantize_model(model, QuantizationConfig(compute_dtype=torch.float32))
    inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["0"]))
    randomize_b(model)
    layer = model[0]
    w0 = dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = model(x)
    expected = float64_reference(x, w0, layer.base_layer.bias, layer.lora_A, layer.lora_B, 2.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_adapter_dtype_is_configurable():
    torch.manual_seed(0)
    model = TinyMLP()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, dtype="bf16"))
    randomize_b(model)
    for _, layer in lora_modules(model):
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    layer = model.fc1
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float32
    expected = float64_reference(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, 2.0)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    assert LoRAConfig(dtype=torch.float16).dtype == "float16"


# ---------------------------------------------------------------------------------------------------- freezing
def test_only_adapters_train_unless_modules_are_kept_trainable():
    model = build_tiny_llama()
    inject_lora(model, LoRAConfig(r=4))
    count = mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if n.endswith(("lora_A", "lora_B"))}
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad) == 8192

    count = mark_only_lora_trainable(model, trainable_modules=["lm_head", "norm"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lm_head.weight", "model.norm.weight"} <= trainable
    assert not any("embed" in n or "base_layer" in n or "layernorm" in n for n in trainable)
    assert count == 8192 + 512 * 64 + 64


@pytest.mark.parametrize("kept", ["lm_head", "embed_tokens"])
def test_a_tied_head_kept_trainable_trains_the_shared_matrix_once(kept):
    """named_parameters() lists a tied matrix under its first name only (embed_tokens): lm_head must still train it."""
    model = build_tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_lora(model, LoRAConfig(r=4))
    count = mark_only_lora_trainable(model, trainable_modules=[kept])
    assert model.lm_head.weight.requires_grad and count == 8192 + 512 * 64  # counted once
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    assert model.lm_head.weight.grad is not None and float(model.lm_head.weight.grad.abs().sum()) > 0


def test_callback_apply_freezes_and_keeps_trainable_modules():
    model = build_tiny_llama()
    callback = LoRA(r=4, trainable_modules=["lm_head"])
    names = callback.apply(model)
    assert len(names) == 14 and callback.injected == names
    assert callback.trainable_params == 8192 + 512 * 64
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


def test_callback_refuses_trainable_modules_its_peft_export_cannot_hold_before_training(tmp_path):
    """A module holding a LoRA layer (its base weight would train): refused at apply, not after the last step."""
    callback = LoRA(r=4, trainable_modules=["self_attn"], export_dir=str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"^LoRA\(trainable_modules=\['self_attn'\]\) with export_dir: ") as err:
        callback.apply(build_tiny_llama())
    assert "\n" not in str(err.value) and "LoRA layer" in str(err.value)
    LoRA(r=4, trainable_modules=["lm_head"], export_dir=str(tmp_path / "adapter")).apply(build_tiny_llama())  # fine


# --------------------------------------------------------------------------------------------------- bad input
def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("r", [0, -4])
def test_nonpositive_rank_is_a_one_line_error(r):
    with pytest.raises(ValueError) as err:
        LoRA(r=r)
    message = one_line(err)
    assert f"r={r}" in message and "positive integer" in message
    with pytest.raises(ValueError, match=f"r={r}"):
        LoRAConfig(r=r)


def test_target_that_matches_nothing_is_a_one_line_error():
    model = build_tiny_llama()
    with pytest.raises(ValueError) as err:
        inject_lora(model, LoRAConfig(r=4, target_modules=["qproj"]))
    message = one_line(err)
    assert "target_modules=['qproj']" in message and "matches no linear layer" in message
    assert "available: model.layers.0.self_attn.q_proj" in message
    with pytest.raises(ValueError, match="exclude_modules=.*matches no linear layer"):
        inject_lora(copy.deepcopy(model), LoRAConfig(r=4, target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_model_without_linear_layers_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        inject_lora(NoLinear(), LoRAConfig(r=4))
    message = one_line(err)
    assert "NoLinear has no linear layers" in message and "nn.Linear" in message


def test_trainable_modules_never_unfreeze_4bit_weights():
    model = build_tiny_llama()
    quantize_model(model)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    count = mark_only_lora_trainable(model, trainable_modules=["q_proj", "k_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.q_proj.lora_{m}" for i in range(2) for m in "AB"}
    assert count == 2 * 4 * (64 + 64)


# ------------------------------------------------------------------------------------------- fused path
def test_fused_is_a_documented_config_switch():
    assert LoRAConfig().fused is True and LoRAConfig(fused=False).to_dict()["fused"] is False
    assert LoRALinear(nn.Linear(64, 64), r=4, alpha=8).fused
    assert not LoRALinear(nn.Linear(64, 64), r=4, alpha=8, fused=False).fused


def test_fused_and_plain_paths_train_a_4bit_llama_alike():
    """Whole model, NF4 base, bf16 autocast, dropout 0.1, non-reentrant checkpointing: same loss and adapter grads."""
    model = build_tiny_llama()
    quantize_model(model, QuantizationConfig())
    inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.1))
    mark_only_lora_trainable(model)
    randomize_b(model, std=0.05)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fused):
        for _, layer in lora_modules(model):
            layer.fused = fused
        torch.manual_seed(7)  # the same dropout masks on both paths
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    fused_loss, fused_grads = loss_and_grads(True)
    plain_loss, plain_grads = loss_and_grads(False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=2**-7, atol=0)
    num = sum(float((f - p).norm() ** 2) for f, p in zip(fused_grads, plain_grads)) ** 0.5
    den = sum(float(p.norm() ** 2) for p in plain_grads) ** 0.5
    assert den > 0 and num / den < 2**-6, num / den


def test_adapters_disabled_runs_the_frozen_base_and_restores_the_adapters():
    from lightning_qlora.lora.experts import ExpertLoRA
    from lightning_qlora.lora.layer import adapters_disabled

    model = nn.Sequential(LoRALinear(nn.Linear(64, 64), 8, 16), LoRALinear(nn.Linear(64, 64), 8, 16))
    holder = nn.ModuleDict({"layers": model, "experts": ExpertLoRA(4, 64, 64, 8, 16)})
    experts = holder["experts"]
    for param in holder.parameters():
        nn.init.normal_(param)
    model[1].disabled = True  # a layer already off stays off afterwards
    x = torch.randn(3, 64)
    adapted = model(x)
    with adapters_disabled(holder):
        assert torch.equal(model(x), model[1].base_layer(model[0].base_layer(x)))
        assert torch.equal(experts(x, 2), torch.zeros(3, 64))
    assert [model[0].disabled, model[1].disabled, experts.disabled] == [False, True, False]
    assert torch.equal(model(x), adapted) and experts(x, 2).abs().sum() > 0
