"""LoRA dropout on the adapter input, and its keep mask stored at 1 bit per element.

On CPU, eagerly, the dropped elements are drawn as positions (:func:`dropped_positions`: one uniform per dropped
element instead of one per element) and zeroed after one scaling pass; on GPUs and under ``torch.compile`` torch's own
``native_dropout``. The fused LoRA function keeps the mask packed (:func:`pack_mask`, :func:`packed_dropout`) and
zeroes dropped gradient elements in backward with an integer AND (:func:`keep_mask_for`, :func:`apply_keep`).
"""

from __future__ import annotations

import math

import torch

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


__all__ = [
    "apply_keep",
    "dropout",
    "dropped_positions",
    "keep_mask_for",
    "pack_mask",
    "packed_dropout",
    "unpack_mask",
]
