"""A fingerprint of the frozen base model, stored in checkpoints so adapters are never resumed onto another base.

It hashes the architecture (every base parameter's name and logical shape), the quantization settings, and a sample
of the values of the parameters that are never quantized (embeddings, norms), rounded to bf16 so the same base
loaded in fp32 or bf16 gives the same fingerprint before and after 4-bit conversion.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from lightning_qlora.lora import is_lora_parameter
from lightning_qlora.quantization import is_4bit_linear

_SAMPLE = 4096


def _logical_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    four_bit = {f"{n}.weight" for n, m in model.named_modules() if is_4bit_linear(m)}
    for name, module in model.named_modules():
        if is_4bit_linear(module):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
    for name, param in model.named_parameters():
        if name not in four_bit and not is_lora_parameter(name):
            shapes[name.replace(".base_layer.", ".")] = tuple(param.shape)
    return {k.replace(".base_layer.", "."): v for k, v in shapes.items()}


def base_fingerprint(model: nn.Module, quantization: dict[str, Any] | None = None) -> str:
    """A short hex digest identifying ``model``'s frozen base and its quantization settings."""
    digest = hashlib.sha256()
    for name, shape in sorted(_logical_shapes(model).items()):
        digest.update(f"{name}:{shape};".encode())
    digest.update(repr(sorted((quantization or {}).items())).encode())
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
                flat = weight.detach().reshape(-1)
                stride = max(1, flat.numel() // _SAMPLE)
                sample = flat[::stride][:_SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
                digest.update(name.encode())
                digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
