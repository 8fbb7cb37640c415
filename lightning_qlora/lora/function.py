"""Fused LoRA linear: two autograd nodes for ``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` over a frozen base.

:class:`LoRAUpdateFunction` computes the adapter branch ``u`` first and keeps what its backward needs;
:class:`LoRALinearFunction` then computes ``x·W0ᵀ + b + u`` in one matmul and keeps nothing. The base weight
``W0`` is either a bitsandbytes 4-bit ``Params4bit`` (dequantized on the fly, in forward and again in backward,
never kept) or a frozen full-precision ``nn.Linear`` weight. Backward needs only ``x`` (the input in the
adapter's compute dtype, the input tensor itself when the dtypes agree) and the small ``x·Aᵀ`` (tokens × r):

* ``grad_x = g·W0 + s·((g·B)·A) ⊙ mask/(1-p)``, with ``W0`` dequantized again;
* ``grad_B = s·gᵀ·(drop(x)·Aᵀ)`` and ``grad_A = s·(g·B)ᵀ·drop(x)``;
* nothing for ``W0`` (frozen); ``grad_b = Σ_tokens g`` only when the bias trains.

Dropout keeps no copy of ``drop(x)``: the mask (:func:`dropout`: on GPUs the ``native_dropout`` call ``F.dropout``
makes, so the plain path's mask for the same RNG state; on CPU one draw per dropped element) is kept bit-packed,
1 bit per element (1/16 of a bf16 ``x``); backward unpacks it. (Replaying the RNG instead would cost a second
draw.) With dropout 0 nothing random happens and no mask exists.

Dtypes follow what autograd gives the plain path: under autocast every matmul runs in the autocast dtype and the
fp32 master ``A``/``B`` get fp32 gradients of the low-precision products; without autocast the base computes in its
own compute dtype (the 4-bit layer's ``compute_dtype``, the plain weight's dtype) and the adapter in its own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


_UNPACK_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_BIT_POSITIONS = torch.arange(8, dtype=torch.uint8)
_PACK_MAGIC = 0x0102040810204080  # byte i of a word (0 or 1) lands on bit 56 + i of word · magic, without carries


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor packed 8 elements per byte (element 8k + i is bit i of byte k; zero-padded to 8)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if torch.compiler.is_compiling():  # one fused kernel under torch.compile (the bytes view below breaks the graph)
        bits = flat.view(-1, 8).to(torch.uint8).bitwise_left_shift(_BIT_POSITIONS.to(flat.device))
        return bits.sum(1, dtype=torch.uint8)
    if not pad and flat.storage_offset() % 8:
        flat = flat.clone()
    words = flat.view(torch.uint8).view(torch.int64)  # 8 bytes of 0/1 per word (storage is 8-byte aligned)
    return words.mul(_PACK_MAGIC).bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the boolean tensor of ``shape`` (one table lookup per byte)."""
    if torch.compiler.is_compiling():  # shifts fuse into one kernel; the cached table below would break the graph
        bits = packed.unsqueeze(1).bitwise_right_shift(_BIT_POSITIONS.to(packed.device)).bitwise_and_(1)
        return bits.view(-1)[: shape.numel()].view(shape).bool()
    return _lookup_bits(packed, shape, torch.bool)


def _lookup_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Each byte's 8 bits from a cached 256 × 8 table: ``True``/``False`` for bool, all ones (-1) / 0 for integers."""
    table = _UNPACK_TABLES.get((packed.device, dtype))
    if table is None:
        bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
        table = torch.arange(256, dtype=torch.uint8, device=packed.device).unsqueeze(1).bitwise_and(bits).ne(0)
        table = table if dtype == torch.bool else table.to(dtype).neg_()  # True -> -1: every bit set
        _UNPACK_TABLES[(packed.device, dtype)] = table
    return table.index_select(0, packed.long()).view(-1)[: shape.numel()].view(shape)


_SAME_WIDTH_INTS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def keep_mask_for(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """:func:`pack_mask`'s bits as what :func:`apply_keep` zeroes ``dtype`` tensors with fastest.

    Eagerly, for bf16/fp16/fp32: integers of ``dtype``'s width, all ones where kept and 0 where dropped, so that a
    bitwise AND zeroes the dropped elements (+0.0 is all-zero bits): one integer pass instead of ``torch.where``'s
    select, which is ~2× slower on CPU. Otherwise (compiling, other dtypes): the boolean mask.
    """
    int_dtype = _SAME_WIDTH_INTS.get(dtype)
    if int_dtype is None or torch.compiler.is_compiling():
        return unpack_mask(packed, shape)
    return _lookup_bits(packed, shape, int_dtype)


def apply_keep(t: torch.Tensor, keep: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``t`` with the elements ``keep`` (from :func:`keep_mask_for`) drops set to zero."""
    if keep.dtype == torch.bool:
        return torch.where(keep, t, t.new_zeros(()))  # 0-dim: faster than a Python 0
    bits = t.view(keep.dtype)
    return (bits.bitwise_and_(keep) if inplace else bits.bitwise_and(keep)).view(t.dtype)


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices of the elements that ``n`` independent Bernoulli(``p``) draws drop (CPU, int64).

    The gaps between successive dropped elements of a Bernoulli process are geometric: ``⌊ln(1-u) / ln(1-p)⌋ + 1``
    for uniform ``u``. Drawing one uniform per *dropped* element (``p·n`` of them) instead of one per element is
    what makes this ~5× cheaper than a per-element draw on torch's single-threaded CPU generator. (fp32 uniforms cut
    the geometric tail where its probability is below 2⁻²⁴.)
    """
    if n == 0 or p == 0:
        return torch.empty(0, dtype=torch.int64)
    inv_log = 1.0 / math.log1p(-p)
    expected = n * p
    per_draw = int(expected + 8 * math.sqrt(expected * (1 - p)) + 64)  # one draw is enough but about never
    chunks, end = [], 0
    while end < n:
        gaps = torch.empty(per_draw).uniform_().neg_().add_(1).log_().mul_(inv_log).floor_().to(torch.int64).add_(1)
        chunks.append(gaps.cumsum_(0).add_(end))
        end = int(chunks[-1][-1])
    positions = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return positions[: int(torch.searchsorted(positions, n, right=True))].sub_(1)


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(x with elements dropped and the rest scaled, keep mask, scale)``: inverted dropout at rate ``p``.

    On CPU, eagerly, the dropped elements are drawn as positions (:func:`dropped_positions`, one uniform per dropped
    element) and zeroed after one scaling pass: several times cheaper than ``F.dropout``'s per-element
    ``bernoulli_`` and its multiply by a boolean mask. On GPUs and under ``torch.compile``: torch's own
    ``native_dropout``.

    Args:
        x: the input (any shape, dtype and layout).
        p: the dropout rate, ``0 <= p < 1``.

    Returns:
        The dropped input (``x``'s shape and dtype), the boolean keep mask and the scale of the kept elements.

    Raises:
        ValueError: if ``p`` is not in ``[0, 1)``.
    """
    if not _drops_positions(x, p):
        dropped, keep = torch.ops.aten.native_dropout(x, p, True)
        return dropped, keep, 1.0 / (1.0 - p)
    dropped, positions, scale = _drop_positions(x, p)
    keep = torch.ones(x.shape, dtype=torch.bool)
    keep.view(-1).index_fill_(0, positions, False)
    return dropped, keep, scale


def _drops_positions(x: torch.Tensor, p: float) -> bool:
    """Whether :func:`dropout` draws ``x``'s dropped positions itself (eager CPU) rather than ``native_dropout``.

    Raises:
        ValueError: if ``p`` is not in ``[0, 1)``.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout rate {p} is not in [0, 1); pass a rate such as 0.05 or 0.1")
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _drop_positions(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(x scaled by 1/(1-p) with the dropped elements zeroed, their flat positions, the scale)``, on CPU."""
    scale = 1.0 / (1.0 - p)
    positions = dropped_positions(x.numel(), p)
    dropped = torch.mul(x, scale).contiguous()  # a new tensor in x's dtype, then the dropped elements zeroed
    dropped.view(-1).index_fill_(0, positions, 0)
    return dropped, positions, scale


def packed_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`dropout` with the keep mask as :func:`pack_mask` bits: on CPU set straight from the dropped positions.

    Raises:
        ValueError: if ``p`` is not in ``[0, 1)``.
    """
    if not _drops_positions(x, p):
        dropped, keep, scale = dropout(x, p)
        return dropped, pack_mask(keep), scale
    dropped, positions, scale = _drop_positions(x, p)
    n = x.numel()
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8)  # dropped bits: distinct powers of two, so adding is OR
    bits.index_add_(0, positions.bitwise_right_shift(3), torch.bitwise_left_shift(1, positions.bitwise_and(7)).byte())
    bits.bitwise_not_()
    if n % 8:
        bits[-1] &= (1 << (n % 8)) - 1  # padding bits 0, as pack_mask leaves them
    return dropped, bits, scale


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
    "dropout",
    "fused_base_weight",
    "fused_lora_linear",
    "pack_mask",
    "unpack_mask",
]
