"""Fused LoRA linear: two autograd nodes for ``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` over a frozen base.

:class:`LoRAUpdateFunction` computes the adapter branch ``u`` first and keeps what its backward needs;
:class:`LoRALinearFunction` then computes ``x·W0ᵀ + b + u`` in one matmul and keeps nothing. The base weight
``W0`` is either a bitsandbytes 4-bit ``Params4bit`` (dequantized on the fly, in forward and again in backward,
never kept) or a frozen full-precision ``nn.Linear`` weight. Backward needs only ``x`` (the input in the
adapter's compute dtype, the input tensor itself when the dtypes agree) and the small ``x·Aᵀ`` (tokens × r):

* ``grad_x = g·W0 + s·((g·B)·A) ⊙ mask/(1-p)``, with ``W0`` dequantized again;
* ``grad_B = s·gᵀ·(drop(x)·Aᵀ)`` and ``grad_A = s·(g·B)ᵀ·drop(x)``;
* nothing for ``W0`` (frozen); ``grad_b = Σ_tokens g`` only when the bias trains.

Dropout keeps no copy of ``drop(x)``: the mask (:mod:`lightning_qlora.lora.dropout`: on GPUs the
``native_dropout`` call ``F.dropout`` makes, so the plain path's mask for the same RNG state; on CPU one draw per
dropped element) is kept bit-packed, 1 bit per element (1/16 of a bf16 ``x``); backward unpacks it. (Replaying the
RNG instead would cost a second draw.) With dropout 0 nothing random happens and no mask exists.

Dtypes follow what autograd gives the plain path: under autocast every matmul runs in the autocast dtype and the
fp32 master ``A``/``B`` get fp32 gradients of the low-precision products; without autocast the base computes in its
own compute dtype (the 4-bit layer's ``compute_dtype``, the plain weight's dtype) and the adapter in its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_qlora.lora.dropout import apply_keep, keep_mask_for, packed_dropout
from lightning_qlora.quantization.nf4 import dequantize_codes, ensure_canonical_packing, is_4bit_linear
from lightning_qlora.utils.imports import bitsandbytes


@dataclass(frozen=True)
class FusedLoRASpec:
    """Everything about one fused call that is not a tensor autograd tracks."""

    scaling: float
    """Factor ``s`` on the update ``B·A·x``."""
    dropout: float
    """Dropout probability on the adapter input (0 in eval mode)."""
    base_dtype: torch.dtype
    """Dtype of the base matmul ``x·W0ᵀ``."""
    lora_dtype: torch.dtype
    """Dtype of the adapter matmuls."""
    out_dtype: torch.dtype
    """Dtype of the result (what the plain path returns)."""
    quant_state: Any = None
    """bitsandbytes ``QuantState`` of a 4-bit base; ``None`` for a plain weight."""

    @property
    def update_dtype(self) -> torch.dtype:
        """Dtype of the adapter branch's result: the adapter's when the base computes in it, else the output's."""
        return self.lora_dtype if self.lora_dtype == self.base_dtype else self.out_dtype


def _dequantized(weight: torch.Tensor, spec: FusedLoRASpec) -> torch.Tensor:
    """``W0`` in the base compute dtype: bitsandbytes' own dequantization of the packed codes, or the plain weight."""
    if spec.quant_state is None:
        return weight.to(spec.base_dtype)
    return dequantize_codes(weight, spec.quant_state, spec.base_dtype)


class LoRAUpdateFunction(torch.autograd.Function):
    """The adapter branch ``u = s·(drop(x)·Aᵀ)·Bᵀ``; keeps ``x``, ``s·x·Aᵀ`` and the packed mask for backward.

    A node of its own, run before the base matmul (:class:`LoRALinearFunction`, which keeps nothing): in a
    checkpointed block it is the last node that keeps tensors, so torch's recompute stops right after it and never
    redoes the block's final base matmul (``down_proj``'s), whose output backward does not need.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, spec: FusedLoRASpec
    ) -> torch.Tensor:
        """Compute ``u`` in ``spec.update_dtype``, shaped ``(*x.shape[:-1], out_features)``."""
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            packed, keep_scale = None, 1.0
            if spec.dropout > 0:
                dropped, packed, keep_scale = packed_dropout(x2, spec.dropout)
                dropped = dropped.to(spec.lora_dtype)
            else:
                dropped = x2.to(spec.lora_dtype)
            a = lora_A.to(spec.lora_dtype)
            b = lora_B.to(spec.lora_dtype)
            xs = torch.mm(dropped, a.t()).mul_(spec.scaling)  # (tokens, r): the only adapter activation kept
            del dropped
            # allocated in x's shape and filled through a 2-D view, so it is never itself a view: the base node adds
            # into it in place, and callers may modify the layer's output in place (Falcon, RoCBERT do)
            update = x2.new_empty((*shape[:-1], b.shape[0]), dtype=spec.update_dtype)
            if spec.update_dtype == spec.lora_dtype:
                torch.mm(xs, b.t(), out=update.view(-1, b.shape[0]))
            else:
                update.view(-1, b.shape[0]).copy_(torch.mm(xs, b.t()))
        ctx.save_for_backward(x2.to(spec.lora_dtype), xs, lora_A, lora_B, packed)  # x itself when dtypes agree
        ctx.spec = spec
        ctx.keep_scale = keep_scale
        ctx.x_dtype = x.dtype
        ctx.x_shape = shape
        return update

    @staticmethod
    def backward(ctx: Any, grad_update: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients for ``x`` (the adapter's share), ``A`` and ``B``."""
        x_saved, xs, lora_A, lora_B, packed = ctx.saved_tensors
        spec: FusedLoRASpec = ctx.spec
        need_x, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad_update.device.type, enabled=False):
            g = grad_update.reshape(-1, grad_update.shape[-1]).to(spec.lora_dtype)
            if need_b:
                grad_b = torch.mm(g.t(), xs).to(lora_B.dtype)  # s·gᵀ·(drop(x)·Aᵀ)
            if need_x or need_a:
                # s·g·B (tokens, r); with dropout also the 1/(1-p) of the kept elements, folded in while it is small
                gb = torch.mm(g, lora_B.to(spec.lora_dtype)).mul_(spec.scaling * ctx.keep_scale)
                keep = None if packed is None else keep_mask_for(packed, x_saved.shape, x_saved.dtype)
                if need_a:
                    dropped = x_saved if keep is None else apply_keep(x_saved, keep)
                    grad_a = torch.mm(gb.t(), dropped).to(lora_A.dtype)
                    del dropped
                if need_x:
                    gx = torch.mm(gb, lora_A.to(spec.lora_dtype))
                    if keep is not None:
                        gx = apply_keep(gx, keep, inplace=True)
                    grad_x = gx.to(ctx.x_dtype).reshape(ctx.x_shape)
        return grad_x, grad_a, grad_b, None


class LoRALinearFunction(torch.autograd.Function):
    """``x·W0ᵀ + b + u`` over the frozen base (``u`` from :class:`LoRAUpdateFunction`); keeps no tensor."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        update: torch.Tensor,
        spec: FusedLoRASpec,
    ) -> torch.Tensor:
        """``weight`` is packed codes when ``spec.quant_state`` is set (dequantized here and again in backward)."""
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(spec.base_dtype)
            w0 = _dequantized(weight, spec)
            in_place = update.dtype == spec.base_dtype == spec.out_dtype and not torch.compiler.is_compiling()
            if in_place:  # u += x·W0ᵀ (+ b): no new tensor, no copy (compiled: Inductor fuses the add; AOT refuses)
                flat = update.view(-1, w0.shape[0])
                flat.addmm_(x2, w0.t())
                if bias is not None:
                    flat.add_(bias.to(spec.base_dtype))
                ctx.mark_dirty(update)
                out = update
            else:
                out = x2.new_empty((*shape[:-1], w0.shape[0]), dtype=spec.base_dtype)  # never a view, as above
                flat = out.view(-1, w0.shape[0])
                if bias is None:
                    torch.mm(x2, w0.t(), out=flat)
                else:
                    torch.addmm(bias.to(spec.base_dtype), x2, w0.t(), out=flat)
                out = out.to(spec.out_dtype).add_(update.to(spec.out_dtype))
            del w0
        ctx.weight = weight  # a frozen parameter: no activation memory, and not recomputed by checkpointing
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        ctx.x_shape = shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``grad_x = g·W0`` (``W0`` dequantized again), ``g`` for ``u``, ``Σ g`` for a bias that trains."""
        spec: FusedLoRASpec = ctx.spec
        need_x, _, need_bias, need_update, _ = ctx.needs_input_grad
        grad_x = grad_bias = grad_update = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1])
            if need_x:
                w0 = _dequantized(ctx.weight, spec)
                grad_x = torch.mm(g.to(spec.base_dtype), w0).to(ctx.x_dtype).reshape(ctx.x_shape)
                del w0
            if need_update:
                grad_update = grad_out.to(spec.update_dtype)
            if need_bias:
                grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_update, None


def _nf4_forward() -> Any:
    from lightning_qlora.quantization.nf4_linear import NF4Linear

    return NF4Linear.forward


def fused_base_weight(base: nn.Module) -> tuple[torch.Tensor, Any] | None:
    """``(weight, quant_state)`` of a base layer the fused path can run over, or ``None`` if it cannot.

    Supported: a bitsandbytes 4-bit linear holding a quantized ``Params4bit`` (``quant_state`` set), and an exact
    ``nn.Linear`` with a frozen floating-point weight. Anything else (a stacked adapter, an unloaded shell, a
    trainable base weight, a subclass with its own forward) keeps the plain path.
    """
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or weight.requires_grad:
        return None
    if type(base) is nn.Linear:
        return (weight, None) if weight.is_floating_point() else None
    if not is_4bit_linear(base):
        return None
    bnb = bitsandbytes()
    if type(base).forward not in (bnb.nn.Linear4bit.forward, _nf4_forward()):
        return None  # a subclass that post-processes the linear map (its own forward must run)

    if not isinstance(weight, bnb.nn.Params4bit):
        return None
    ensure_canonical_packing(base)  # a CPU inference repack would make the packed codes unreadable here
    fix_4bit_weight_quant_state_from_module = bitsandbytes().nn.modules.fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    state = getattr(base.weight, "quant_state", None)
    return (base.weight.data, state) if state is not None else None


def fused_lora_linear(
    x: torch.Tensor,
    base: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float,
) -> torch.Tensor | None:
    """The fused LoRA forward over ``base``, or ``None`` when it does not apply (the caller runs the plain path).

    Args:
        x: input, ``(..., in_features)``.
        base: the frozen base layer (4-bit or plain ``nn.Linear``).
        lora_A: adapter down-projection, ``(r, in_features)``.
        lora_B: adapter up-projection, ``(out_features, r)``.
        scaling: factor ``s`` on the update.
        dropout: dropout probability on the adapter input (pass 0 in eval mode).

    Returns:
        ``x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` in the dtype the plain path returns, or ``None``.
    """
    if not x.is_floating_point():
        return None
    found = fused_base_weight(base)
    if found is None:
        return None
    weight, quant_state = found
    bias = getattr(base, "bias", None)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
        base_dtype = lora_dtype = compute
        out_dtype = x.dtype if quant_state is not None else compute  # 4-bit layers return the input's dtype
    else:
        if quant_state is not None:
            base_dtype = getattr(base, "compute_dtype", None) or x.dtype
        elif x.dtype != weight.dtype:
            return None  # the plain path raises torch's own dtype-mismatch error
        else:
            base_dtype = weight.dtype
        lora_dtype = lora_A.dtype
        out_dtype = x.dtype
    spec = FusedLoRASpec(scaling, dropout, base_dtype, lora_dtype, out_dtype, quant_state)
    update = LoRAUpdateFunction.apply(x, lora_A, lora_B, spec)
    return LoRALinearFunction.apply(x, weight, bias, update, spec)


__all__ = [
    "FusedLoRASpec",
    "LoRALinearFunction",
    "LoRAUpdateFunction",
    "fused_base_weight",
    "fused_lora_linear",
]
