"""Quantization-aware adapter initialisation (LoftQ-style): A and B start from the 4-bit base's rounding error.

For a frozen 4-bit base ``Q = q(W)`` the residual ``R = W − deq(Q)`` is factorised at the adapter's rank:
``R ≈ U_r·Σ_r·V_rᵀ`` (truncated SVD, the best rank-r approximation), ``B = U_r·√(Σ_r/s)``, ``A = √(Σ_r/s)·V_rᵀ``,
so ``s·B·A = U_r·Σ_r·V_rᵀ`` and the step-0 layer ``deq(Q) + s·B·A`` is closer to ``W`` than ``deq(Q)`` alone
(Li et al. 2023, "LoftQ", one alternation step). With ``iters > 1`` the base is re-quantized from ``W − s·B·A`` and the
new residual factorised again (LoftQ's alternating steps); that changes the 4-bit base itself, so the LoRA callback
uses one step only: its base stays bit-identical to what ``NF4Precision`` loads from the checkpoint (resume, the base
fingerprint, ``evaluate --adapter`` and merging keep working unchanged).

The adapters then carry ``R_r`` (the rank-r part of the rounding error) plus what training adds: the exported PEFT
adapter belongs on the same 4-bit base; on the original 16-bit base it would add ``R_r`` twice (see
docs/quality.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lightning_qlora.lora.layer import LoRALinear, lora_modules
from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, is_4bit_linear, make_params4bit

__all__ = ["checkpoint_tensors", "loftq_init_", "loftq_init_model", "residual_factors"]


def residual_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling·B·A`` the best rank-``r`` approximation of ``residual`` (truncated SVD).

    Args:
        residual: the ``out × in`` matrix to approximate (fp32 or fp64).
        r: the rank.
        scaling: the adapter's ``alpha / r`` (or ``alpha / √r``).

    Returns:
        ``A`` (``r × in``) and ``B`` (``out × r``), in ``residual``'s dtype; ``√σ`` is split evenly between them.
    """
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def loftq_init_(layer: LoRALinear, weight: torch.Tensor, iters: int = 1) -> tuple[float, float]:
    """Set ``layer``'s A and B from the residual of its 4-bit base against the original ``weight``, in place.

    Args:
        layer: a :class:`LoRALinear` whose base is a bitsandbytes 4-bit linear quantized from ``weight``.
        weight: the original ``out × in`` weight ``W`` (any float dtype; computed in fp32).
        iters: LoftQ alternations; ``iters > 1`` re-quantizes the base from ``W − s·B·A`` between them.

    Returns:
        ``(‖W − deq(Q)‖, ‖W − deq(Q) − s·B·A‖)`` (Frobenius norms; the base ``Q`` as it is on return).

    Raises:
        ValueError: if the base is not 4-bit, ``weight`` has the wrong shape, or ``iters < 1``.
    """
    base = layer.base_layer
    if not is_4bit_linear(base):
        raise ValueError(f"LoftQ init needs a 4-bit base layer, got {type(base).__name__}; quantize the model first")
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"LoftQ init: weight of shape {tuple(weight.shape)} does not fit a {layer.out_features}×"
            f"{layer.in_features} layer; pass the checkpoint tensor of this layer"
        )
    if iters < 1:
        raise ValueError(f"LoftQ iters={iters} must be >= 1")
    w = weight.detach().to(device=layer.lora_A.device, dtype=torch.float32)
    a = b = None
    for step in range(iters):
        if step:  # LoftQ's alternation: Q = q(W − s·B·A)
            _requantize(base, w - layer.scaling * (b @ a))
        residual = w - dequantize_weight(base, torch.float32)
        a, b = residual_factors(residual, layer.r, layer.scaling)
    before = residual.norm().item()
    after = (residual - layer.scaling * (b @ a)).norm().item()
    layer.lora_A.copy_(a)
    layer.lora_B.copy_(b)
    return before, after


def _requantize(base: torch.nn.Module, weight: torch.Tensor) -> None:
    """Replace a 4-bit layer's codes with those of ``weight``, keeping its quantization settings."""
    old = base.weight
    config = QuantizationConfig(
        quant_type=old.quant_type,
        double_quant=old.compress_statistics,
        blocksize=old.blocksize,
        compute_dtype=getattr(base, "compute_dtype", None) or torch.float32,
        quant_storage=old.quant_storage,
    )
    new = make_params4bit(weight, config, old.device)
    new.module = base
    base.weight = new
    base.quant_state = new.quant_state


def loftq_init_model(
    model: torch.nn.Module, weights: Callable[[str], torch.Tensor | None], iters: int = 1
) -> tuple[list[str], list[str]]:
    """LoftQ-initialise every :class:`LoRALinear` of ``model`` whose base is 4-bit.

    Args:
        model: the model with adapters (names as in ``model.named_modules()``).
        weights: the original weight of a module by its parameter name (``"model.layers.0.mlp.up_proj.weight"``),
            or None when there is none.
        iters: LoftQ alternations (see :func:`loftq_init_`).

    Returns:
        ``(initialised, skipped)`` layer names; skipped layers have no 4-bit base (their residual is zero, so a
        LoftQ init would give ``A = B = 0``, which cannot train) and keep the default init.

    Raises:
        ValueError: if a 4-bit layer's original weight is missing.
    """
    done: list[str] = []
    skipped: list[str] = []
    for name, layer in lora_modules(model):
        if not is_4bit_linear(layer.base_layer):
            skipped.append(name)
            continue
        key = f"{name}.weight"
        weight = weights(key)
        if weight is None:
            raise ValueError(
                f"LoftQ init: no tensor {key!r} in the base checkpoint; it needs the checkpoint's own weight names "
                "(use init='zeros' for this model)"
            )
        loftq_init_(layer, weight, iters)
        done.append(name)
    return done, skipped


def checkpoint_tensors(files: Iterable[str | os.PathLike]) -> Callable[[str], torch.Tensor | None]:
    """Look up tensors by name in safetensors files, one tensor read at a time (no full copy of the checkpoint).

    Args:
        files: the checkpoint's ``.safetensors`` shards.

    Returns:
        A function from a tensor name to the tensor (None when no shard has it).
    """
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in map(Path, files):
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))

    def read(name: str) -> torch.Tensor | None:
        file = where.get(name)
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    return read
