"""The fused LoRA autograd function: loss and grads vs a float64 recompute, dropout, checkpointing, repack, memory."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_qlora.lora.dropout import dropout
from lightning_qlora.lora.function import LoRALinearFunction, fused_base_weight, fused_lora_linear
from lightning_qlora.lora.layer import LoRAConfig, LoRALinear, inject_lora, mark_only_lora_trainable
from lightning_qlora.quantization.nf4 import QuantizationConfig, linear_to_4bit

IN, OUT, R, ALPHA = 128, 192, 16, 32.0  # scaling 2


def make_layer(quantized: bool, dropout: float = 0.0, bias: bool = True, seed: int = 0, compute=torch.float32):
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.08)
    if quantized:
        base = linear_to_4bit(linear, QuantizationConfig(compute_dtype=compute), "cpu")
    else:
        base = linear.requires_grad_(False)
    layer = LoRALinear(base, r=R, alpha=ALPHA, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)  # B = 0 at init would hide every adapter gradient but B's
    return layer


def w0_of(layer: LoRALinear) -> torch.Tensor:
    base = layer.base_layer
    if isinstance(base.weight, bnb.nn.Params4bit):
        return dequantize_4bit(base.weight.data, base.weight.quant_state)
    return base.weight.detach()


def probe_weights(out_features: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, out_features, dtype=torch.float64)


def run(layer: LoRALinear, x: torch.Tensor, autocast: bool = False, seed: int = 5):
    """Loss = Σ y·w (a non-uniform upstream gradient); returns (y, loss, grad x, grad A, grad B)."""
    x = x.detach().clone().requires_grad_(True)
    layer.lora_A.grad = layer.lora_B.grad = None
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    loss = (y.double() * probe_weights(y.shape[-1])).sum()
    loss.backward()
    return y.detach(), loss.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


def float64_reference(layer: LoRALinear, x: torch.Tensor):
    """Dequant + matmul + LoRA, everything in float64 through autograd."""
    x = x.detach().double().requires_grad_(True)
    a = layer.lora_A.detach().double().requires_grad_(True)
    b = layer.lora_B.detach().double().requires_grad_(True)
    w0 = w0_of(layer).double()
    y = x @ w0.T + layer.scaling * (x @ a.T) @ b.T
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.detach().double()
    loss = (y * probe_weights(y.shape[-1])).sum()
    loss.backward()
    return y.detach(), loss.detach(), x.grad, a.grad, b.grad


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


# ----------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("quantized", [False, True], ids=["plain-base", "4bit-base"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fp32_loss_and_grads_match_a_float64_recompute(quantized, bias):
    layer = make_layer(quantized, bias=bias)
    x = torch.randn(2, 24, IN, generator=torch.Generator().manual_seed(1))  # 3-D input
    y, loss, gx, ga, gb = run(layer, x)
    assert y.dtype == torch.float32 and y.shape == (2, 24, OUT)
    assert ga.dtype == gb.dtype == torch.float32 and gx.shape == x.shape
    ey, eloss, egx, ega, egb = float64_reference(layer, x)
    torch.testing.assert_close(y.double(), ey, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, eloss, rtol=1e-6, atol=1e-4)
    for got, expected in ((gx, egx), (ga, ega), (gb, egb)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True], ids=["plain-base", "4bit-base"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32-in", "bf16-in"])
def test_bf16_autocast_matches_a_float64_recompute_within_bf16_tolerance(quantized, x_dtype):
    layer = make_layer(quantized, compute=torch.bfloat16)
    x = torch.randn(2, 24, IN, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    y, loss, gx, ga, gb = run(layer, x, autocast=True)
    # the plain path's dtypes: a 4-bit layer returns its input's dtype, an nn.Linear under autocast bf16
    assert y.dtype == (x_dtype if quantized else torch.bfloat16)
    assert gx.dtype == x_dtype and ga.dtype == gb.dtype == torch.float32  # fp32 masters get fp32 grads
    ey, eloss, egx, ega, egb = float64_reference(layer, x)
    assert rel_err(y, ey) < 2**-7
    assert abs(float(loss - eloss)) < 2**-7 * float(ey.abs().sum())
    for got, expected in ((gx, egx), (ga, ega), (gb, egb)):
        assert rel_err(got, expected) < 2**-7, rel_err(got, expected)
    # and the plain path (bitsandbytes matmul_4bit + peft-style LoRA) agrees with the fused one at the same level
    layer.fused = False
    py, _, pgx, pga, pgb = run(layer, x, autocast=True)
    assert py.dtype == y.dtype
    for got, plain in ((y, py), (gx, pgx), (ga, pga), (gb, pgb)):
        assert rel_err(got, plain.double()) < 2**-7


@pytest.mark.parametrize("quantized", [False, True], ids=["plain-base", "4bit-base"])
def test_cpu_dropout_matches_a_float64_recompute_and_the_plain_path_with_the_same_draw(quantized):
    layer = make_layer(quantized, dropout=0.3)
    x = torch.randn(3, 16, IN, generator=torch.Generator().manual_seed(3))
    y, loss, gx, ga, gb = run(layer, x, seed=11)
    after_fused = torch.get_rng_state()
    torch.manual_seed(11)  # the forward's first draw: the mask, as positions of the dropped elements
    _, keep, scale = dropout(x.reshape(-1, IN), 0.3)
    assert scale == 1 / (1 - 0.3)
    assert abs(float(keep.float().mean()) - 0.7) < 4 * (0.3 * 0.7 / keep.numel()) ** 0.5
    x64 = x.detach().double().requires_grad_(True)
    a = layer.lora_A.detach().double().requires_grad_(True)
    b = layer.lora_B.detach().double().requires_grad_(True)
    dropped = x64 * keep.view(x.shape) * scale
    ey = x64 @ w0_of(layer).double().T + layer.scaling * (dropped @ a.T) @ b.T + layer.base_layer.bias.double()
    (ey * probe_weights(OUT)).sum().backward()
    torch.testing.assert_close(y.double(), ey.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in ((gx, x64.grad), (ga, a.grad), (gb, b.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    other_mask = run(layer, x, seed=12)
    assert not torch.allclose(other_mask[3], ga)  # the mask really differs per RNG state and grad A sees it
    layer.fused = False  # the plain path draws its mask with the same function: the same mask
    plain = run(layer, x, seed=11)
    assert torch.equal(torch.get_rng_state(), after_fused)  # the same draws from the global generator
    for got, expected in zip((y, loss, gx, ga, gb), plain):  # fp32 rounding differs only in the order of the scaling
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layer.eval()  # no dropout in eval mode: the fused path with p = 0 equals the float64 recompute
    layer.fused = True
    y, _, gx, ga, gb = run(layer, x)
    ey, _, egx, ega, egb = float64_reference(layer, x)
    for got, expected in ((y, ey), (gx, egx), (ga, ega), (gb, egb)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_non_reentrant_checkpointing_gives_identical_grads(dropout):
    layer = make_layer(True, dropout=dropout)
    x = torch.randn(2, 16, IN, generator=torch.Generator().manual_seed(4))
    weights = probe_weights(OUT).float()

    def grads(use_checkpoint: bool):
        xx = x.clone().requires_grad_(True)
        layer.lora_A.grad = layer.lora_B.grad = None
        torch.manual_seed(9)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if use_checkpoint:
                y = checkpoint(lambda t: torch.tanh(layer(t)), xx, use_reentrant=False)
            else:
                y = torch.tanh(layer(xx))
        (y.float() * weights).sum().backward()
        return xx.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    for plain, ckpt in zip(grads(False), grads(True)):
        assert torch.equal(plain, ckpt)


def test_bias_that_trains_gets_its_gradient_and_a_frozen_input_gets_none():
    layer = make_layer(True)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(6))  # 2-D, needs no grad (a frozen embedding)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoRALinearFunctionBackward"
    (y.double() * probe_weights(OUT)).sum().backward()
    expected = probe_weights(OUT).float().expand(5, OUT).sum(0)
    torch.testing.assert_close(layer.base_layer.bias.grad, expected)
    _, _, _, ega, egb = float64_reference(layer, x)
    torch.testing.assert_close(layer.lora_A.grad.double(), ega, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), egb, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- the 4-bit storage
def test_packed_bits_never_change_while_training():
    layer = make_layer(True, dropout=0.1)
    codes = layer.base_layer.weight.data.clone()
    state = layer.base_layer.weight.quant_state
    absmax, nested_absmax = state.absmax.clone(), state.state2.absmax.clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    x = torch.randn(4, 8, IN, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]  # the adapter trained
    weight = layer.base_layer.weight
    assert isinstance(weight, bnb.nn.Params4bit) and not weight.requires_grad and weight.grad is None
    assert torch.equal(weight.data, codes)
    assert torch.equal(weight.quant_state.absmax, absmax)
    assert torch.equal(weight.quant_state.state2.absmax, nested_absmax)


def test_training_after_an_eval_no_grad_forward_is_right():
    """Our NF4Linear never repacks; the fused path reads the canonical codes after a validation-style pass."""
    layer = make_layer(True)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(8))
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, IN))
    with torch.inference_mode():
        layer(torch.randn(4, IN))
    layer.train()
    assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    _, _, gx, ga, gb = run(layer, x)
    _, _, egx, ega, egb = float64_reference(layer, x)
    for got, expected in ((gx, egx), (ga, ega), (gb, egb)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu,
    reason="bitsandbytes only repacks 4-bit weights on CPUs with avx512-bf16",
)
def test_fused_path_restores_a_layer_bitsandbytes_repacked():
    torch.manual_seed(0)
    raw = bnb.nn.Linear4bit(IN, OUT, bias=False, quant_type="nf4")
    raw.compute_dtype, raw.compute_type_is_set = torch.float32, True
    raw.load_state_dict({"weight": torch.randn(OUT, IN) * 0.08})
    raw = raw.to("cpu")  # bitsandbytes quantizes here
    codes = raw.weight.data.clone()
    layer = LoRALinear(raw, r=R, alpha=ALPHA)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, IN))  # bitsandbytes' own forward: repacks in place
    assert raw.weight.quant_state.packing_format_for_cpu
    layer.train()
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(8))
    with pytest.warns(UserWarning, match="repacked by bitsandbytes"):
        _, _, gx, ga, gb = run(layer, x)
    assert torch.equal(raw.weight.data, codes) and not raw.weight.quant_state.packing_format_for_cpu
    _, _, egx, ega, egb = float64_reference(layer, x)  # against the restored dequantization
    for got, expected in ((gx, egx), (ga, ega), (gb, egb)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ what backward keeps
def saved_bytes(layer: LoRALinear, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward that are not parameters (the activations)."""
    params = {p.data_ptr() for p in layer.parameters()} | {layer.base_layer.weight.data.data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_backward_keeps_only_x_and_x_times_a(dropout):
    layer = make_layer(True, dropout=dropout, compute=torch.bfloat16)
    tokens = 256
    x = torch.randn(tokens, IN, dtype=torch.bfloat16, requires_grad=True)
    fused = saved_bytes(layer, x)
    mask_bytes = tokens * IN // 8 if dropout > 0 else 0  # the dropout mask, bit-packed
    assert fused == tokens * IN * 2 + tokens * R * 2 + mask_bytes  # x (bf16, not copied) + x·Aᵀ (bf16); no W0
    layer.fused = False
    plain = saved_bytes(layer, x)
    assert plain > fused  # the plain path also keeps x·Aᵀ's input (with dropout: its own copy and the positions)


# --------------------------------------------------------------------------------- when it applies
def test_fused_is_the_default_training_forward_and_can_be_switched_off():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN))
    inject_lora(model, LoRAConfig(r=4, target_modules=["0"]))
    mark_only_lora_trainable(model)  # as the LoRA callback does: the fused path needs a frozen base
    assert model[0].fused and "fused=True" in repr(model[0])
    x = torch.randn(3, IN, requires_grad=True)
    assert type(model[0](x).grad_fn).__name__ == "LoRALinearFunctionBackward"
    with torch.no_grad():  # inference keeps the plain path
        assert model[0](x).grad_fn is None

    off = nn.Sequential(nn.Linear(IN, OUT))
    inject_lora(off, LoRAConfig(r=4, target_modules=["0"], fused=False))
    mark_only_lora_trainable(off)
    assert not off[0].fused
    assert type(off[0](x).grad_fn).__name__ != "LoRALinearFunctionBackward"


def test_bases_it_cannot_run_over_fall_back_to_the_plain_path():
    trainable = nn.Linear(IN, OUT)  # a base weight that trains (trainable_modules): needs autograd's own path
    assert fused_base_weight(trainable) is None
    layer = LoRALinear(trainable, r=4, alpha=8)
    x = torch.randn(2, IN)
    layer(x).sum().backward()
    assert trainable.weight.grad is not None

    stacked = LoRALinear(make_layer(False), r=4, alpha=8)  # an adapter over an adapter
    assert fused_base_weight(stacked.base_layer) is None
    assert type(stacked(x.requires_grad_()).grad_fn).__name__ != "LoRALinearFunctionBackward"

    with torch.device("meta"):
        shell = nn.Linear(IN, OUT).requires_grad_(False)
    assert fused_base_weight(shell) is None
    frozen = nn.Linear(IN, OUT).requires_grad_(False)
    a, b = torch.zeros(4, IN, requires_grad=True), torch.zeros(OUT, 4, requires_grad=True)
    assert fused_lora_linear(x.double(), frozen, a, b, 1.0, 0.0) is None  # dtype mismatch: torch's own error
    assert fused_lora_linear(torch.ones(2, IN, dtype=torch.long), frozen, a, b, 1.0, 0.0) is None


def test_function_gives_no_gradient_to_the_base_weight():
    layer = make_layer(False)
    x = torch.randn(2, IN, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    assert isinstance(y.grad_fn, LoRALinearFunction._backward_cls)
    y.sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_checkpointed_block_recompute_stops_before_the_last_base_matmul(monkeypatch):
    """The adapter branch is the block's last node that keeps tensors: torch's recompute ends there, so the final
    layer's base weight is dequantized in forward and backward only (the first layer's also in the recompute)."""
    import lightning_qlora.lora.function as function

    first, last = make_layer(True, dropout=0.1, seed=1), make_layer(True, dropout=0.1, seed=2)
    last.base_layer, last.lora_A, last.lora_B = (
        linear_to_4bit(nn.Linear(OUT, IN), QuantizationConfig(compute_dtype=torch.float32), "cpu"),
        nn.Parameter(torch.randn(R, OUT) * 0.1),
        nn.Parameter(torch.randn(IN, R) * 0.1),
    )
    seen = []
    dequantized = function._dequantized
    monkeypatch.setattr(function, "_dequantized", lambda w, spec: seen.append(w.data_ptr()) or dequantized(w, spec))
    x = torch.randn(3, 8, IN, generator=torch.Generator().manual_seed(3))

    def grads(use_checkpoint: bool):
        seen.clear()
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(4)

        def block(t):
            return t + last(torch.tanh(first(t)))

        y = checkpoint(block, xx, use_reentrant=False) if use_checkpoint else block(xx)
        (y * y).sum().backward()
        found = [xx.grad] + [p.grad.clone() for p in (first.lora_A, first.lora_B, last.lora_A, last.lora_B)]
        for p in (first.lora_A, first.lora_B, last.lora_A, last.lora_B):
            p.grad = None
        return found, list(seen)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert len(plain_calls) == 4 and len(ckpt_calls) == 5  # forward 2, recompute 1 (first only), backward 2
    last_codes = last.base_layer.weight.data.data_ptr()
    assert ckpt_calls.count(last_codes) == 2 == plain_calls.count(last_codes)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


@pytest.mark.parametrize("autocast", [False, True])
def test_output_is_a_fresh_tensor_callers_may_modify_in_place(autocast):
    """Base + branch is written into the branch's own buffer: not a view, and in-place edits by callers (Falcon,
    RoCBERT) keep the gradients right."""
    layer = make_layer(True, dropout=0.0)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(12))
    grads = []
    for edit in (False, True):
        xx = x.clone().requires_grad_(True)
        layer.lora_A.grad = layer.lora_B.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xx)
            assert y._base is None and type(y.grad_fn).__name__ == "LoRALinearFunctionBackward"
            z = y.mul_(2.0) if edit else y * 2.0
        (z.float() * probe_weights(OUT).float()).sum().backward()
        grads.append((xx.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for plain, edited in zip(*grads):
        assert torch.equal(plain, edited)
