"""``NF4Linear``: bitsandbytes' ``Linear4bit`` with a forward that keeps the training layout on CPU.

Importing this module imports bitsandbytes; the rest of the package reaches it lazily.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lightning_qlora.utils.imports import bitsandbytes

bnb = bitsandbytes()
fix_4bit_weight_quant_state_from_module = bnb.nn.modules.fix_4bit_weight_quant_state_from_module


def ensure_canonical_packing(layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repack of ``layer`` (lossy, so warn) and stop it from happening again.

    bitsandbytes swaps the packed weight into a CPU-specific layout in place when a ``Linear4bit`` runs in eval mode
    on an input that needs no grad (avx512-bf16 CPUs). Backward through that layout is silently wrong, and the
    inverse re-quantizes the absmax constants after rounding them to bf16.
    """
    inference = getattr(layer, "cpu_inference_kernel", False)  # repacked on purpose: see use_cpu_inference_kernel
    if not inference and getattr(layer, "support_avx512bf16_for_cpu", False):  # write only once: a write on every
        layer.support_avx512bf16_for_cpu = False  # call is a side effect that breaks torch.compile's graph
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        _convert_weight_packed_for_cpu_inverse = bitsandbytes().functional._convert_weight_packed_for_cpu_inverse

        if not inference:
            warnings.warn(
                "A 4-bit layer had been repacked by bitsandbytes' CPU inference path (an eval-mode forward outside "
                "lightning_qlora); restoring the training layout. Its absmax constants were rounded to bf16 by that "
                "repack, so outputs can differ slightly from the original quantization.",
                stacklevel=3,
            )
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
        layer.quant_state = layer.weight.quant_state


class NF4Linear(bnb.nn.Linear4bit):
    """A frozen 4-bit linear layer: ``y = x · dequant(W)ᵀ + b`` computed in ``compute_dtype``.

    Storage is bitsandbytes' ``Params4bit`` (same bits, same state-dict keys as ``Linear4bit``); only the forward
    differs: it never switches to the CPU inference layout, so a validation pass cannot corrupt later backward.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.support_avx512bf16_for_cpu = False
        self.cpu_inference_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize-and-matmul in ``compute_dtype``; returns the input's dtype."""
        if self.cpu_inference_kernel and not torch.is_grad_enabled() and x.device.type == "cpu":
            return super().forward(x)  # bitsandbytes' own: repacked once for its bf16 CPU kernel (inference only)
        ensure_canonical_packing(self)
        fix_4bit_weight_quant_state_from_module(self)
        input_dtype = x.dtype
        compute_dtype = self.compute_dtype or x.dtype
        x = x.to(compute_dtype)
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        return bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=self.weight.quant_state).to(input_dtype)


_CPU_KERNEL_BLOCK_N = 32
"""bitsandbytes' CPU repack (``_convert_weight_packed_for_cpu``) takes output features in blocks of this many."""


def use_cpu_inference_kernel(model: nn.Module) -> int:
    """Let the bf16 ``NF4Linear`` layers of an inference-only ``model`` use bitsandbytes' CPU kernel; returns how many.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight once into a layout its fused bf16 kernel reads
    directly: decoding one token through a 576 × 1536 layer takes ~0.06 ms instead of ~0.23 ms to dequantize and
    multiply. The repack rounds the absmax constants to bf16 and cannot be trained through, so only the inference
    commands (``generate``, ``chat``, ``serve``: nothing trains or saves the base after) switch it on, and only for
    layers that compute in bf16 and whose shape its repack takes (output features a multiple of 32, input features a
    multiple of the quantization block: DeepSeek-V3's 80-wide ``kv_a_proj_with_mqa`` is not). Elsewhere (other CPUs,
    fp32 compute, GPUs) nothing changes.
    """
    if not bnb.functional.has_avx512bf16():
        return 0
    count = 0
    for module in model.modules():
        if (
            isinstance(module, NF4Linear)
            and module.compute_dtype == torch.bfloat16
            and not module.training
            and module.out_features % _CPU_KERNEL_BLOCK_N == 0
            and module.in_features % module.weight.quant_state.blocksize == 0  # its constants: whole blocks a row
        ):
            module.cpu_inference_kernel = module.support_avx512bf16_for_cpu = True
            count += 1
    return count
