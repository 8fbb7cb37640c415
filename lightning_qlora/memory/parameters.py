"""What a base model's parameters become under quantization: the expert stacks held in 4 bits, the rest by kind."""

from __future__ import annotations

import torch
from torch import nn

from lightning_qlora.quantization.experts import expert_stacks, stack_names
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.quantization.shells import is_router


def quantized_stacks(net: nn.Module, quantization: QuantizationConfig | None) -> list[torch.Tensor]:
    """The 3-D expert stacks the loader quantizes (none without quantization or where experts cannot be 4-bit)."""
    if quantization is None:
        return []
    found = expert_stacks(net, skip=quantization.skip_modules, strict=False)  # others stay full precision
    return [getattr(module, stack) for _, module in found for stack in stack_names(module)]


def unquantized_kinds(net: nn.Module, quantized: set[int]) -> str:
    """What the full-precision parameters are, largest kind first (``embeddings, head, norms``)."""
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    kinds: dict[str, int] = {}
    for module_name, module in net.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in quantized:
                continue
            if isinstance(module, nn.Embedding):
                kind = "embeddings"
            elif module is head:
                kind = "head"
            elif name.endswith("bias"):
                kind = "biases"
            elif "norm" in f"{module_name}.{name}".lower():
                kind = "norms"
            elif is_router(module_name, module):
                kind = "routers"
            else:
                kind = "other (full-precision matmuls)" if param.dim() >= 2 else "other"
            kinds[kind] = kinds.get(kind, 0) + param.numel()
    return ", ".join(sorted(kinds, key=lambda k: -kinds[k])) or "none"
