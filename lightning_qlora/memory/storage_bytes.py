"""Bytes as bitsandbytes stores them: 4-bit weights with their constants, and (paged, 8-bit) optimizer states."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_qlora.quantization.nf4 import QuantizationConfig

PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages optimizer state buffers only for tensors with at least this many elements."""
_STATES: dict[str, int] = {"adam": 2, "lion": 1, "ademamix": 3}  # state buffers per parameter


def quantized_bytes(numel: int, config: QuantizationConfig) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight of ``numel`` values (code tables excluded: shared).

    Codes: ``ceil(n/2)`` bytes (rounded up to the storage dtype); absmax: one fp32 per block, or with double
    quantization one uint8 per block plus one fp32 per 256 blocks and an fp32 offset.
    """
    item = config.quant_storage.itemsize
    codes = math.ceil(math.ceil(numel / 2) / item) * item
    blocks = math.ceil(numel / config.blocksize)
    constants = blocks + 4 * math.ceil(blocks / 256) + 4 if config.double_quant else 4 * blocks
    return codes + constants


def code_table_bytes(config: QuantizationConfig) -> int:
    """The shared lookup tables: 16 fp32 values (NF4/FP4) plus 256 fp32 for the nested 8-bit state."""
    return 16 * 4 + (256 * 4 if config.double_quant else 0)


def optimizer_bytes(numels: Sequence[int], optimizer: str, dtype: torch.dtype) -> tuple[int, int]:
    """``(state bytes, paged bytes)`` of ``optimizer`` over parameters of the given sizes.

    With ``k`` state buffers (AdamW 2, Lion 1, AdEMAMix 3): 32-bit is ``4k`` B/param; 8-bit is ``k`` B/param plus
    ``k`` fp32 absmax per 256 values (tensors under 4096 values stay 32-bit), plus the shared 256-value maps. Torch's
    ``adamw``/``adam`` keep two states in the parameter dtype plus a step counter per tensor. Paged (CUDA) state
    buffers are those of tensors with at least 100k values.

    Raises:
        ValueError: for an unknown optimizer name.
    """
    name = optimizer.strip().lower().replace("-", "_")
    if name in ("adamw", "adam"):
        return sum(2 * n * dtype.itemsize + 4 for n in numels), 0
    from lightning_qlora.optim.paged import check_optimizer_name

    name = check_optimizer_name(name)
    k = _STATES[name.removeprefix("paged_").split("_")[0].replace("adamw", "adam")]
    total = paged = 0
    maps = 0
    for n in numels:
        if name.endswith("8bit") and n >= 4096:
            buffers, absmax = k * n, 4 * k * math.ceil(n / 256)
            maps = 4 * 256 * min(k, 2)
        else:
            buffers, absmax = 4 * k * n, 0
        total += buffers + absmax
        paged += buffers if name.startswith("paged") and n >= PAGED_MIN_NUMEL else 0
    return total + maps, paged
