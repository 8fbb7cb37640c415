"""LoftQ-style init: A, B from the 4-bit rounding error; checked against a float64 SVD, the original model and peft."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_qlora.callbacks.lora import LoRA, loftq_from_checkpoint
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules
from lightning_qlora.lora.loftq import loftq_init_, loftq_init_model, residual_factors
from lightning_qlora.lora.peft_format import export_peft
from lightning_qlora.models.sources import load_causal_lm
from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, guard_cpu_repack
from lightning_qlora.quantization.shells import quantize_model

QCONFIG = QuantizationConfig(compute_dtype=torch.float32)
LORA = LoRAConfig(r=8, alpha=16, dropout=0.0)


def quantized_with_adapters(base):
    """``base`` (conftest's tiny Llama, fp32: the reference ``W``) quantized to NF4 + DQ, adapters r=8 (B = 0)."""
    model = copy.deepcopy(base)
    quantize_model(model, QCONFIG)
    inject_lora(model, LORA)
    return model


@pytest.fixture(scope="module")
def loftq_model(base):
    model = quantized_with_adapters(base)
    done, skipped = loftq_init_model(model, base.state_dict().get)
    assert len(done) == 14 and skipped == []
    return model


@torch.no_grad()
def logits(model, ids):
    guard_cpu_repack(model)
    return model(ids).logits


def test_factors_are_the_best_rank_r_approximation():
    residual = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    a, b = residual_factors(residual, 8, 0.5)
    assert a.shape == (8, 128) and b.shape == (64, 8)
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]  # Eckart–Young: the closest rank-8 matrix
    torch.testing.assert_close((0.5 * b @ a).double(), best, atol=1e-5, rtol=0)
    assert torch.allclose(a.norm(dim=1), b.norm(dim=0), atol=1e-5)  # sqrt(sigma) on each side


def test_loftq_brings_every_layer_closer_to_the_original(base, loftq_model):
    for name, layer in lora_modules(loftq_model):
        w = base.get_submodule(name).weight.double()
        deq = dequantize_weight(layer.base_layer, torch.float64)
        rounding = (w - deq).norm()
        step0 = (w - deq - layer.delta_weight(torch.float64)).norm()
        assert step0 < 0.9 * rounding, name
        s = torch.linalg.svdvals(w - deq)  # what is left is the tail of the spectrum, nothing more
        assert step0.item() == pytest.approx(s[LORA.r :].norm().item(), rel=1e-4)


def test_step0_model_is_closer_to_the_original_and_peft_loads_it_on_the_4bit_base(base, ids, loftq_model, tmp_path):
    peft = pytest.importorskip("peft")
    want = logits(base, ids)
    plain_4bit = copy.deepcopy(base)
    quantize_model(plain_4bit, QCONFIG)  # the same codes as under the adapters: quantization is deterministic
    ours = logits(loftq_model, ids)
    assert (ours - want).abs().mean() < 0.9 * (logits(plain_4bit, ids) - want).abs().mean()

    export_peft(loftq_model, tmp_path, LORA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(plain_4bit, str(tmp_path)).eval()  # the same 4-bit base
    torch.testing.assert_close(logits(theirs, ids), ours, atol=1e-5, rtol=0)


def test_iterations_requantize_the_base_and_still_reduce_the_error(base):
    layer = quantized_with_adapters(base).model.layers[0].mlp.down_proj
    w = base.model.layers[0].mlp.down_proj.weight
    codes = layer.base_layer.weight.data.clone()
    rounding, one = loftq_init_(layer, w, iters=1)
    assert torch.equal(layer.base_layer.weight.data, codes)  # one step leaves the base as loaded
    _, two = loftq_init_(layer, w, iters=3)
    assert not torch.equal(layer.base_layer.weight.data, codes)  # Q = q(W − s·B·A)
    deq = dequantize_weight(layer.base_layer, torch.float32)
    assert (w - deq - layer.delta_weight()).norm().item() == pytest.approx(two, rel=1e-4)
    assert two < rounding and one < rounding


def test_layers_without_a_4bit_base_keep_the_zero_init_and_errors(base):
    model = copy.deepcopy(base)
    inject_lora(model, LORA)
    done, skipped = loftq_init_model(model, lambda name: None)
    assert done == [] and len(skipped) == 14
    assert all(torch.count_nonzero(layer.lora_B) == 0 for _, layer in lora_modules(model))
    with pytest.raises(ValueError, match="needs a 4-bit base"):
        loftq_init_(model.model.layers[0].mlp.up_proj, torch.zeros(128, 64))

    quantized = quantized_with_adapters(base)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        loftq_init_model(quantized, lambda name: None)
    with pytest.raises(ValueError, match="does not fit"):
        loftq_init_(quantized.model.layers[0].mlp.up_proj, torch.zeros(64, 128))
    with pytest.raises(ValueError, match="init='nope'"):
        LoRAConfig(init="nope")


def test_callback_reads_w_from_the_checkpoint_folder(tiny_llama_dir, base):
    """The LoRA callback's ``init="loftq"``: W from the model's safetensors (the tiny Llama saved is ``base``)."""

    class Module(nn.Module):  # a LightningModule stand-in: the network under `.model`
        def __init__(self, model):
            super().__init__()
            self.model = model

    module = Module(load_causal_lm(tiny_llama_dir, quantization=QCONFIG, dtype=torch.float32))
    callback = LoRA(r=8, alpha=16, dropout=0.0, init="loftq")
    assert callback.config.init == "loftq" and len(callback.apply(module)) == 14
    layer = module.model.model.layers[1].self_attn.o_proj
    w = base.model.layers[1].self_attn.o_proj.weight
    deq = dequantize_weight(layer.base_layer)
    assert (w - deq - layer.delta_weight()).norm() < (w - deq).norm()

    with pytest.raises(ValueError, match="not a local folder"):
        loftq_from_checkpoint(quantized_with_adapters(base))  # built in memory: no checkpoint folder to read W from
