"""Merging LoRA into base weights, checked against a float64 recompute and a transformers reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_tiny_llama
from safetensors import safe_open
from torch import nn

from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules
from lightning_qlora.lora.merge import MergeReport, merge_lora, save_merged_safetensors
from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, linear_to_4bit
from lightning_qlora.quantization.nf4_linear import NF4Linear
from lightning_qlora.quantization.shells import quantize_model

QCONFIG = QuantizationConfig(compute_dtype=torch.float32)


def lora_model(base, quantize=False, config=None, seed=1):
    model = copy.deepcopy(base)
    inject_lora(model, config or LoRAConfig(r=8, alpha=16, dropout=0.1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    if quantize:
        quantize_model(model, QCONFIG)
    return model.eval()


def exact_weights(model):
    """``dequant(W0) + scaling·B·A`` per LoRA layer, recomputed in float64 from the parts."""
    out = {}
    for name, layer in lora_modules(model):
        w0 = dequantize_weight(layer.base_layer, torch.float64)
        delta = layer.lora_B.double() @ layer.lora_A.double() * layer.scaling
        out[name] = (w0 + delta, layer.base_layer.bias)
    return out


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.float()


def params_to(model, dtype):
    """Cast parameters only, as ``from_pretrained(dtype=...)`` does (rotary buffers stay fp32)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-base", "nf4-base"])
def test_merge_bf16_matches_float64_recompute(base, quantize):
    model = lora_model(base, quantize)
    exact = exact_weights(model)
    report = merge_lora(model)
    assert isinstance(report, MergeReport) and len(report.layers) == 14
    for layer in report.layers:
        merged = model.get_submodule(layer.name)
        assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
        assert not merged.weight.requires_grad
        want, _ = exact[layer.name]
        assert torch.equal(merged.weight, want.to(torch.bfloat16))
        assert layer.max_abs_error == pytest.approx((merged.weight.double() - want).abs().max().item(), abs=0)
        assert 0 < layer.max_abs_error <= want.abs().max().item() * 2**-8  # bf16: 8 significant bits
    assert not list(lora_modules(model))
    table = report.table()
    assert "model.layers.1.mlp.down_proj" in table and "merged 14 layers to bf16 (bfloat16)" in table


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-base", "nf4-base"])
def test_merge_fp32_matches_unmerged_logits(base, ids, quantize):
    model = lora_model(base, quantize)
    exact = exact_weights(model)
    before = logits(model, ids)
    report = merge_lora(model, dtype=torch.float32)
    assert report.max_abs_error < 1e-7
    for name, (want, _) in exact.items():
        torch.testing.assert_close(model.get_submodule(name).weight.double(), want, atol=1e-7, rtol=0)
    torch.testing.assert_close(logits(model, ids), before, atol=2e-5, rtol=0)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-base", "nf4-base"])
def test_save_merged_bf16_reloads_with_transformers(base, ids, tmp_path, quantize):
    from transformers import AutoModelForCausalLM

    model = lora_model(base, quantize)
    before = logits(model, ids)
    merge_lora(model)
    params_to(model, torch.bfloat16)
    merged = logits(model, ids)
    scale = before.abs().max().item()
    torch.testing.assert_close(merged, before, atol=0.03 * scale, rtol=0)  # bf16 through two layers
    out = save_merged_safetensors(model, tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    torch.testing.assert_close(logits(reloaded, ids), merged, atol=0, rtol=0)


def test_merge_nf4_requantizes(base, ids):
    model = lora_model(base, quantize=True)
    exact = exact_weights(model)
    report = merge_lora(model, "nf4")
    assert report.dtype == "nf4"
    for layer in report.layers:
        merged = model.get_submodule(layer.name)
        assert isinstance(merged, NF4Linear)
        state = merged.weight.quant_state
        assert (state.quant_type, state.blocksize, bool(state.nested), merged.compute_dtype) == (
            "nf4",
            64,
            True,
            torch.float32,
        )
        want, _ = exact[layer.name]
        plain = nn.Linear(want.shape[1], want.shape[0], bias=False)
        plain.weight.data = want.float()
        reference = linear_to_4bit(plain, QCONFIG, "cpu")
        assert torch.equal(merged.weight.data, reference.weight.data)  # same bits as quantizing the exact sum
        error = (dequantize_weight(merged, torch.float64) - want).abs().max().item()
        assert layer.max_abs_error == pytest.approx(error, abs=0)
        assert error <= 0.16 * want.abs().max().item()  # half the widest NF4 gap, times the block absmax
    reference = merge_lora(lora_model(base, quantize=True), dtype=torch.float32)
    assert report.max_abs_error > reference.max_abs_error
    assert torch.isfinite(logits(model, ids)).all()


def test_merge_nf4_from_full_precision_base_uses_given_config(base):
    model = lora_model(base, config=LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    report = merge_lora(model, "nf4", quantization=QuantizationConfig(blocksize=128, double_quant=False))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, NF4Linear) and layer.weight.quant_state.blocksize == 128
    assert not layer.weight.quant_state.nested and layer.compute_dtype == torch.bfloat16
    assert len(report.layers) == 2


def test_tied_embeddings_stored_once(ids, tmp_path):
    from transformers import AutoModelForCausalLM

    tied = build_tiny_llama(tie_word_embeddings=True).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    model = lora_model(tied)  # all-linear leaves the tied head alone
    merge_lora(model, dtype=torch.float32)
    out = save_merged_safetensors(model, tmp_path / "tied")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


def test_adapter_on_tied_head_unties_it(ids, tmp_path):
    from transformers import AutoModelForCausalLM

    tied = build_tiny_llama(tie_word_embeddings=True).eval()
    model = lora_model(tied, config=LoRAConfig(r=4, alpha=8, target_modules=["lm_head", "q_proj"]))
    before = logits(model, ids)
    merge_lora(model, dtype=torch.float32)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    out = save_merged_safetensors(model, tmp_path / "untied")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, ids), before, atol=2e-5, rtol=0)


def test_save_replaces_stale_checkpoint_files(base, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        (out / name).write_text("stale")
    (out / "tokenizer.json").write_text("{}")
    model = lora_model(base, config=LoRAConfig(r=4, alpha=8))
    merge_lora(model)
    save_merged_safetensors(params_to(model, torch.bfloat16), out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_errors(base, tmp_path):
    with pytest.raises(ValueError, match="has no LoRA layers to merge"):
        merge_lora(copy.deepcopy(base))
    model = lora_model(base, config=LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="target='fp8' is not supported"):
        merge_lora(model, "fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has LoRA adapters; call merge_lora"):
        save_merged_safetensors(model, tmp_path / "x")
    quantize_model(model, QCONFIG)
    merge_lora(model)
    with pytest.raises(ValueError, match="k_proj is a 4-bit layer"):
        save_merged_safetensors(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tie", [False, True], ids=["head+norm", "tied-embedding"])
def test_merged_checkpoint_keeps_the_modules_trained_besides_the_adapters(ids, tmp_path, tie):
    """An adapter with ``modules_to_save`` (a trained head and norm, or a trained embedding tied to the head), loaded
    by import_peft and merged: the saved checkpoint holds the trained tensors and computes what the adapter did."""
    from transformers import AutoModelForCausalLM

    from lightning_qlora.lora.layer import is_lora_parameter, mark_only_lora_trainable
    from lightning_qlora.lora.peft_format import export_peft, import_peft

    base = build_tiny_llama(tie_word_embeddings=tie).eval()
    trained = lora_model(base, config=LoRAConfig(r=4, alpha=8, dropout=0.0))
    mark_only_lora_trainable(trained, ["embed_tokens"] if tie else ["lm_head", "norm"])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if param.requires_grad and not is_lora_parameter(name):
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    export_peft(trained, tmp_path / "adapter", LoRAConfig(r=4, alpha=8, dropout=0.0))
    model = copy.deepcopy(base)
    import_peft(model, tmp_path / "adapter")
    before = logits(trained, ids)
    merge_lora(model, dtype=torch.float32)
    out = save_merged_safetensors(model, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tie
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(reloaded.lm_head.weight, trained.lm_head.weight)
    assert torch.equal(reloaded.model.norm.weight, trained.model.norm.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    assert not torch.equal(reloaded.lm_head.weight, base.lm_head.weight)
    torch.testing.assert_close(logits(reloaded, ids), before, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # stacks stored out x in, and in x out
@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-base", "nf4-base"])
def test_expert_adapters_are_merged_into_their_stacks(arch, quantize, ids, tmp_path):
    """Merged MoE weights give the adapted model's logits; no adapter or 4-bit stack is left, and transformers
    loads the saved folder with the same logits (the adapters used to be left out silently)."""
    from architecture_worker import tiny_config
    from transformers import AutoModelForCausalLM

    from lightning_qlora.lora.experts import expert_lora_modules, inject_expert_lora
    from lightning_qlora.quantization.experts import quantize_expert_stacks

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).float().eval()
    config = LoRAConfig(r=4, alpha=8, dropout=0.0)
    inject_lora(model, config)
    if quantize:
        quantize_model(model, QCONFIG)
        quantize_expert_stacks(model, QCONFIG)
    assert inject_expert_lora(model, config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, lora in [*lora_modules(model), *expert_lora_modules(model)]:
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.2)
    expected = logits(model, ids)
    report = merge_lora(model, "bf16", dtype=torch.float32)
    stacks = [layer for layer in report.layers if "experts" in layer.name]
    assert len(stacks) == 4 and all(layer.max_abs_delta > 0 and layer.max_abs_error < 1e-6 for layer in stacks)
    assert not expert_lora_modules(model)
    merged = logits(model, ids)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    save_merged_safetensors(model, tmp_path / "merged")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32-base", "nf4-base"])
def test_gpt2_conv1d_layers_merge_back_into_conv1d(quantize, ids, tmp_path):
    """GPT-2 stores its weights in x out (``Conv1D``): the merged layers stay ``Conv1D`` so the saved checkpoint has
    the layout transformers loads (an out x in weight used to fail to load, or load transposed when square); a 4-bit
    merge keeps recording that its layer came from a ``Conv1D``."""
    from architecture_worker import tiny_config
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("gpt2")).float().eval()
    model = lora_model(base, quantize, config=LoRAConfig(r=4, alpha=8, dropout=0.0), seed=2)
    adapted = [name for name, _ in lora_modules(model)]
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"c_attn", "c_proj", "c_fc"}
    expected = logits(model, ids)
    four_bit = copy.deepcopy(model)
    report = merge_lora(model, "bf16", dtype=torch.float32)
    assert all(layer.max_abs_error < 1e-6 and layer.max_abs_delta > 0 for layer in report.layers)
    assert all(type(model.get_submodule(name)) is Conv1D for name in adapted)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)
    save_merged_safetensors(model, tmp_path / "merged")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, ids), expected, rtol=1e-4, atol=1e-4)
    merge_lora(four_bit, "nf4", QCONFIG)
    assert all(four_bit.get_submodule(name).source_cls is Conv1D for name in adapted)
    quantize_model(model, QCONFIG)  # the plain merged Conv1D layers quantized as a loaded GPT-2 is: the same bits
    torch.testing.assert_close(logits(four_bit, ids), logits(model, ids), rtol=0, atol=1e-6)
