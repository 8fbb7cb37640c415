"""NF4 quantization of linear layers, checked against bitsandbytes' own quantize/dequantize, and the CPU repack trap."""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from conftest import NoLinear, TinyMLP, build_tiny_llama
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRA, NF4Precision
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, mark_only_lora_trainable
from lightning_qlora.quantization.nf4 import (
    QuantizationConfig,
    dequantize_codes,
    dequantize_weight,
    ensure_canonical_packing,
    guard_cpu_repack,
    is_4bit_linear,
)
from lightning_qlora.quantization.nf4_linear import NF4Linear
from lightning_qlora.quantization.shells import quantize_model
from lightning_qlora.utils.dtypes import fast_compute_dtype

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def has_avx512bf16() -> bool:
    return bool(bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu)


needs_repacking_cpu = pytest.mark.skipif(
    not has_avx512bf16(), reason="bitsandbytes only repacks 4-bit weights on CPUs with avx512-bf16"
)


def reference_quantize(weight: torch.Tensor, config: QuantizationConfig):
    return quantize_4bit(
        weight,
        blocksize=config.blocksize,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=config.quant_storage,
    )


def assert_same_quantization(layer: nn.Module, weight: torch.Tensor, config: QuantizationConfig) -> None:
    """Packed codes and every quantization constant equal bitsandbytes' own quantize_4bit of ``weight``."""
    packed, state = reference_quantize(weight, config)
    assert layer.weight.dtype == config.quant_storage
    assert torch.equal(layer.weight.data.view(torch.uint8), packed.view(torch.uint8))
    ours = layer.weight.quant_state
    assert ours.quant_type == config.quant_type and ours.blocksize == config.blocksize
    assert ours.nested == config.double_quant
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.code, state.code)
    if config.double_quant:
        assert torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.state2.absmax, state.state2.absmax)
        assert torch.equal(ours.state2.code, state.state2.code)


# ----------------------------------------------------------------------------------------------- layer replacement
def test_nf4precision_replaces_every_linear_but_the_head():
    torch.manual_seed(0)
    model = TinyMLP()
    reference = copy.deepcopy(model)
    plugin = NF4Precision()
    plugin.convert_module(model)

    assert plugin.quantized_names == ["fc1", "fc2"]
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        assert isinstance(layer, NF4Linear) and isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.quant_type == "nf4" and layer.weight.blocksize == 64
        assert layer.weight.compress_statistics is True and layer.weight.quant_state.nested
        assert layer.compute_dtype == fast_compute_dtype("cpu") and layer.weight.dtype == torch.uint8  # "auto"
        assert torch.equal(layer.bias, getattr(reference, name).bias)
        assert_same_quantization(layer, getattr(reference, name).weight.data, plugin.config)
    assert type(model.output) is nn.Linear  # the head by name
    assert torch.equal(model.output.weight, reference.output.weight)


def test_llama_head_and_embeddings_stay_full_precision():
    model = build_tiny_llama()
    reference = copy.deepcopy(model)
    quantized = quantize_model(model)
    assert len(quantized) == 2 * len(LLAMA_LINEARS)
    assert all(name.rsplit(".", 1)[-1] in LLAMA_LINEARS for name in quantized)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")


class TiedToy(nn.Module):
    """A head with an unusual name whose weight is tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 64)
        self.body = nn.Linear(64, 64)
        self.proj_out = nn.Linear(64, 128, bias=False)
        self.proj_out.weight = self.embed.weight

    def forward(self, ids):
        return self.proj_out(self.body(self.embed(ids)))


def test_head_tied_to_embedding_is_skipped_whatever_its_name():
    torch.manual_seed(0)
    model = TiedToy()
    assert quantize_model(model) == ["body"]
    assert type(model.proj_out) is nn.Linear and model.proj_out.weight is model.embed.weight

    llama = build_tiny_llama(tie_word_embeddings=True)
    quantize_model(llama)
    assert type(llama.lm_head) is nn.Linear and llama.lm_head.weight is llama.model.embed_tokens.weight


def test_skip_modules_by_name_and_regex():
    model = build_tiny_llama()
    NF4Precision(skip_modules=["lm_head", "q_proj", r"model\.layers\.1\..*"]).convert_module(model)
    layer0, layer1 = model.model.layers
    assert type(layer0.self_attn.q_proj) is nn.Linear and is_4bit_linear(layer0.self_attn.k_proj)
    assert all(type(m) is nn.Linear for m in layer1.modules() if isinstance(m, nn.Linear))


# ------------------------------------------------------------------------------------ bits and forward vs bitsandbytes
CONFIGS = {
    "nf4-dq-bf16": dict(),
    "fp4-dq": dict(quant_type="fp4"),
    "nf4-no-dq": dict(double_quant=False),
    "nf4-fp16": dict(compute_dtype="fp16"),
    "nf4-storage-bf16": dict(quant_storage="bf16"),
    "nf4-blocksize-128": dict(blocksize=128),
}


@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
def test_bits_and_forward_match_bitsandbytes(options):
    plugin = NF4Precision(**options)
    config = plugin.config
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192), nn.Linear(192, 64, bias=False))
    weights = [model[0].weight.data.clone(), model[1].weight.data.clone()]
    bias = model[0].bias.data.clone()
    plugin.convert_module(model)

    cd = config.compute_dtype
    for layer, weight in zip(model, weights):
        assert isinstance(layer, NF4Linear)
        assert_same_quantization(layer, weight, config)
    layer, weight = model[0], weights[0]
    packed, state = reference_quantize(weight, config)
    w_ref = dequantize_4bit(packed, state).to(cd)
    assert torch.equal(dequantize_weight(layer, cd), w_ref)

    x = torch.randn(3, 5, 128)
    expected = F.linear(x.to(cd), w_ref, bias.to(cd)).to(x.dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    layer.eval()
    with torch.inference_mode():  # the path bitsandbytes would repack on
        assert torch.equal(layer(x), expected)
    layer.train()
    x_grad = x.clone().requires_grad_()
    out = layer(x_grad)
    assert torch.equal(out, expected)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(x_grad.grad, (upstream.to(cd) @ w_ref).to(x.dtype))


def test_fp32_compute_turns_autocast_off_and_bad_options_fail():
    plugin = NF4Precision(compute_dtype="fp32")  # warns where bf16 is native: tests/plugins/test_precision.py
    assert plugin.config.compute_dtype == torch.float32 and not plugin.autocast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NF4Precision(compute_dtype="fp16").config.compute_dtype == torch.float16
        assert NF4Precision(compute_dtype=torch.bfloat16).config.compute_dtype == torch.bfloat16
    for kwargs, needle in [
        (dict(quant_type="int4"), "quant_type='int4'"),
        (dict(blocksize=48), "blocksize=48"),
        (dict(compute_dtype="fp8"), "'fp8'"),
    ]:
        with pytest.raises(ValueError, match=needle) as err:
            NF4Precision(**kwargs)
        assert "\n" not in str(err.value)


def test_precision_names_follow_options():
    assert NF4Precision().config.compute_dtype == fast_compute_dtype("cuda" if torch.cuda.is_available() else "cpu")
    assert NF4Precision().precision == "nf4-dq"
    assert NF4Precision(quant_type="fp4", double_quant=False).precision == "fp4"
    assert NF4Precision(compute_dtype="bf16").config.describe() == {
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": 64,
        "compute_dtype": "bfloat16",
        "quant_storage": "uint8",
    }


def test_quantize_model_is_idempotent():
    torch.manual_seed(0)
    model = TinyMLP()
    assert quantize_model(model) == ["fc1", "fc2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_model(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_model_without_linear_layers_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        NF4Precision().convert_module(NoLinear())
    message = str(err.value)
    assert "\n" not in message
    assert "NoLinear has no linear layer" in message and "nn.Linear" in message
    # only skipped heads: the message names them and says what to check
    with pytest.raises(ValueError, match=r"Sequential has no linear layer to quantize \(none at all\)"):
        quantize_model(nn.Sequential())
    head_only = nn.Module()
    head_only.output = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"only skipped ones: \['output'\].*skip_modules"):
        quantize_model(head_only)


# ---------------------------------------------------------------------------------------------- the CPU repack trap
def _plain_bnb_layer(weight: torch.Tensor) -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, quant_type="nf4")
    layer.compute_dtype, layer.compute_type_is_set = torch.float32, True
    layer.load_state_dict({"weight": weight})
    return layer.to("cpu")  # bitsandbytes quantizes here


@needs_repacking_cpu
def test_bitsandbytes_repack_trap_reproduces():
    """Documents the trap: bitsandbytes' own Linear4bit, once run in eval mode on a no-grad input on an avx512-bf16 CPU,
    swaps its weight into a CPU inference layout in place; backward through that layout gives no input gradient."""
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.1
    layer = _plain_bnb_layer(weight)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    good = x.grad.clone()
    assert torch.equal(good, torch.ones(4, 64) @ dequantize_4bit(layer.weight.data, layer.weight.quant_state))

    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 128))
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked in place
    layer.train()
    x.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "autograd kernel was not registered ... silently incorrect"
        layer(x).sum().backward()
    assert x.grad is None or not torch.equal(x.grad, good)  # silently wrong


@needs_repacking_cpu
def test_guard_cpu_repack_restores_a_repacked_layer():
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.1
    layer = _plain_bnb_layer(weight)
    codes = layer.weight.data.clone()
    original = dequantize_4bit(codes, layer.weight.quant_state)  # (dequantize_weight would guard the layer)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 128))
    assert layer.weight.quant_state.packing_format_for_cpu
    model = nn.Sequential(layer)

    with pytest.warns(UserWarning, match="repacked by bitsandbytes"):
        assert guard_cpu_repack(model) == 1
    state = layer.weight.quant_state
    assert not state.packing_format_for_cpu and state.nested
    assert torch.equal(layer.weight.data, codes)  # the 4-bit codes are back; absmax went through bf16
    restored = dequantize_4bit(layer.weight.data, state)
    torch.testing.assert_close(restored, original, rtol=2e-2, atol=1e-3)

    # backward is right again, and eval/no-grad forwards no longer repack
    x = torch.randn(4, 128, requires_grad=True)
    layer.train()
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 64) @ restored)
    layer.eval()
    with torch.inference_mode():
        layer(torch.randn(4, 128))
    assert not layer.weight.quant_state.packing_format_for_cpu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_canonical_packing(layer)  # nothing to restore: no warning


def test_nf4_linear_never_repacks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    quantize_model(model)
    layer = model[0]
    layer.support_avx512bf16_for_cpu = True  # even if someone turns bitsandbytes' CPU path back on
    codes = layer.weight.data.clone()
    layer.eval()
    with torch.inference_mode():
        layer(torch.randn(4, 128))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, codes)


class Regression(L.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class GradRecorder(L.Callback):
    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(
            {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None}
        )


def _loader():
    gen = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen))
    return DataLoader(data, batch_size=8)


def _grads_after_fit(
    net: nn.Module, with_validation: bool, plugins: list, fused: bool = True
) -> list[dict[str, torch.Tensor]]:
    recorder = GradRecorder()
    trainer = L.Trainer(
        plugins=plugins,
        callbacks=[LoRA(r=4, alpha=8, dropout=0.0, fused=fused), recorder],
        max_steps=2,
        num_sanity_val_steps=1 if with_validation else 0,
        limit_val_batches=1 if with_validation else 0,
        val_check_interval=1,  # a validation pass between the two steps as well
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    torch.manual_seed(7)  # same adapter init in every run
    trainer.fit(Regression(net), _loader(), _loader())
    return recorder.grads


def _bnb_mlp() -> nn.Module:
    """TinyMLP whose hidden layers are bitsandbytes' own Linear4bit (as a from_pretrained(load_in_4bit) model has)."""
    torch.manual_seed(0)
    net = TinyMLP()
    for name in ("fc1", "fc2"):
        setattr(net, name, _plain_bnb_layer(getattr(net, name).weight.data))
    return net


def test_validation_pass_leaves_lora_gradients_exactly_unchanged():
    torch.manual_seed(0)
    net = TinyMLP()
    plain = _grads_after_fit(copy.deepcopy(net), with_validation=False, plugins=[NF4Precision()])
    validated = _grads_after_fit(copy.deepcopy(net), with_validation=True, plugins=[NF4Precision()])
    assert len(plain) == len(validated) == 2
    for step_plain, step_validated in zip(plain, validated):
        assert (
            set(step_plain)
            == set(step_validated)
            == {f"net.{layer}.lora_{m}" for layer in ("fc1", "fc2") for m in "AB"}
        )
        for name in step_plain:
            assert torch.equal(step_plain[name], step_validated[name]), name
    assert plain[1]["net.fc1.lora_A"].abs().sum() > 0  # gradients reach the first layer through the 4-bit one


@needs_repacking_cpu
def test_nf4precision_guards_bitsandbytes_own_layers_in_a_trainer():
    """Without the plugin a validation pass corrupts training of a plain bitsandbytes model through bitsandbytes' own
    forward (the plain LoRA path); with the plugin, or with the fused LoRA path, it does not."""
    reference = _grads_after_fit(_bnb_mlp(), with_validation=False, plugins=[], fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corrupted = _grads_after_fit(_bnb_mlp(), with_validation=True, plugins=[], fused=False)
        fused = _grads_after_fit(_bnb_mlp(), with_validation=True, plugins=[], fused=True)
    # after the sanity-check pass repacked fc2, no gradient flows back through it: fc1's adapter gets zeros
    assert reference[0]["net.fc1.lora_B"].abs().sum() > 0
    assert torch.count_nonzero(corrupted[0].get("net.fc1.lora_B", torch.zeros(1))) == 0
    # the fused function restores the canonical packing before it dequantizes, whatever bitsandbytes did
    fused_reference = _grads_after_fit(_bnb_mlp(), with_validation=False, plugins=[], fused=True)
    assert torch.count_nonzero(fused[0]["net.fc1.lora_B"]) > 0
    for ref, step in zip(fused_reference, fused):  # close, not equal: undoing the repack re-rounds absmax via bf16
        for name in ref:
            torch.testing.assert_close(step[name], ref[name], rtol=0, atol=1e-2 * float(ref[name].abs().max()))
    guarded = _grads_after_fit(_bnb_mlp(), with_validation=True, plugins=[NF4Precision()])
    guarded_reference = _grads_after_fit(_bnb_mlp(), with_validation=False, plugins=[NF4Precision()])
    for ref, step in zip(guarded_reference, guarded):
        assert set(ref) == set(step)
        assert all(torch.equal(ref[name], step[name]) for name in ref)


def test_lora_adapters_on_a_quantized_base_are_never_quantized():
    model = build_tiny_llama()
    quantize_model(model)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    mark_only_lora_trainable(model)
    assert quantize_model(model) == []  # quantizing again leaves the adapters alone
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert type(param) is nn.Parameter and param.dtype == torch.float32 and param.requires_grad


def test_dequantize_codes_writes_the_compute_dtype_directly_as_bitsandbytes_no_grad_matmul_does():
    """A bf16 checkpoint computed in fp32: no bf16 rounding of the dequantized weight in any path."""
    weight = torch.randn(192, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codes, state = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    fp32 = dequantize_codes(codes, state, torch.float32)
    # bitsandbytes' own float64-free reference: its no-grad 4-bit matmul dequantizes into the input's dtype
    x = torch.eye(128)
    with torch.no_grad():
        assert torch.equal(bnb.matmul_4bit(x, codes.t(), quant_state=state).t(), fp32)
    rounded = dequantize_4bit(codes, state).float()  # the checkpoint's dtype first, then fp32: what this replaces
    assert 0 < (fp32 - rounded).abs().max() <= 2**-8 * fp32.abs().max()
    assert state.dtype == torch.bfloat16  # the layer's state is left as it was
    assert torch.equal(dequantize_codes(codes, state, torch.bfloat16), dequantize_4bit(codes, state))
    assert torch.equal(dequantize_codes(codes, state, torch.float64), fp32.double())


def test_inference_only_models_use_bitsandbytes_cpu_kernel_where_the_cpu_has_it():
    """``use_cpu_inference_kernel``: bf16 layers of an eval model on an AVX512-BF16 CPU use bitsandbytes' fused
    kernel (repacked once); anything that needs the codes restores them silently; other CPUs are left alone."""
    from lightning_qlora.quantization.nf4_linear import use_cpu_inference_kernel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192), nn.Linear(192, 80), nn.Linear(80, 64))  # 80 outputs: no repack
    quantize_model(model, QuantizationConfig(compute_dtype=torch.bfloat16))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert use_cpu_inference_kernel(model) == 0  # train mode: never
    model.eval()
    with torch.no_grad():
        expected = model(x).float()
    switched = use_cpu_inference_kernel(model)
    if not bnb.functional.has_avx512bf16():
        assert switched == 0
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has no fused CPU kernel here (nothing changes)")
    codes = model[0].weight.data.clone()
    assert switched == 1 and not model[1].cpu_inference_kernel  # 80 outputs (DeepSeek-V3's kv_a_proj), 80 inputs
    with torch.no_grad():
        got = model(x).float()
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)  # its own layout now
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)  # bf16 absmax and accumulation order
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # restoring a layer repacked on purpose is silent
        reference = dequantize_weight(model[0])
    assert torch.equal(model[0].weight.data, codes) and reference.shape == (192, 128)
    with torch.no_grad():  # and the next inference forward repacks again
        torch.testing.assert_close(model(x).float(), got)
