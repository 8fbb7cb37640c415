"""A fingerprint of the frozen base model, stored in checkpoints so adapters are never resumed onto another base.

:func:`fingerprint_parts` describes the base in four parts: the architecture (every base parameter's name and
logical shape), the quantization settings, one digest per frozen full-precision tensor (embeddings, norms, biases,
unquantized heads) over a sample of its values rounded to bf16, so the same base loaded in fp32 or bf16 matches
before and after 4-bit conversion, and one digest per 4-bit weight over a sample of its packed codes (compared once
both sides are quantized: a base merged with another adapter keeps its embeddings and norms, not its codes).
Keeping the parts apart lets a mismatch be named and tensors that are not loaded yet be left out;
:func:`fingerprint_digest` is the short hex digest of the parts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from lightning_qlora.lora.layer import is_lora_parameter
from lightning_qlora.quantization.nf4 import is_4bit_linear
from lightning_qlora.utils.imports import bitsandbytes

_SAMPLE = 4096


def _holds_4bit_weight(module: nn.Module) -> bool:
    # a 4-bit layer, or an empty quantize-on-load shell; not a shell that loaded a full-precision (e.g. tied) weight
    if not is_4bit_linear(module):
        return False
    bnb = bitsandbytes()

    return isinstance(module.weight, bnb.nn.Params4bit) or module.weight.device.type == "meta"


def _logical_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    bnb = bitsandbytes()
    shapes: dict[str, tuple[int, ...]] = {}
    four_bit = {f"{n}.weight": m for n, m in model.named_modules() if _holds_4bit_weight(m)}
    for name, module in four_bit.items():
        shapes[name] = (module.out_features, module.in_features)
    for name, param in model.named_parameters():
        if name in four_bit or is_lora_parameter(name):
            continue
        state = getattr(param, "quant_state", None)  # a 4-bit expert stack: its logical 3-D shape
        shapes[name] = (
            tuple(state.shape) if isinstance(param, bnb.nn.Params4bit) and state is not None else tuple(param.shape)
        )
    return {k.replace(".base_layer.", "."): v for k, v in shapes.items()}


def _value_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE)
    sample = flat[::stride][:_SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def frozen_value_digests(model: nn.Module) -> dict[str, str]:
    """One digest per frozen full-precision base tensor that holds values (embeddings, norms, biases, heads).

    Trainable tensors, adapters, 4-bit weights and tensors still on the meta device are left out.
    """
    bnb = bitsandbytes()

    out: dict[str, str] = {}
    for name, param in model.named_parameters():
        if param.requires_grad or is_lora_parameter(name) or isinstance(param, bnb.nn.Params4bit):
            continue
        if param.device.type == "meta" or not param.is_floating_point():
            continue
        out[name.replace(".base_layer.", ".")] = _value_digest(param)
    return out


def quantized_code_digests(model: nn.Module) -> dict[str, str]:
    """One digest per 4-bit tensor (linear weights, expert stacks) over a sample of its packed codes.

    Tensors not quantized yet (full-precision weights before the plugin converts them, meta shells) are left out.
    """
    bnb = bitsandbytes()
    out: dict[str, str] = {}
    for name, param in model.named_parameters():
        if not isinstance(param, bnb.nn.Params4bit) or param.device.type == "meta" or not param.is_contiguous():
            continue
        codes = param.detach().reshape(-1).view(torch.uint8)
        stride = max(1, codes.numel() // _SAMPLE)
        sample = codes[::stride][:_SAMPLE].to("cpu")
        out[name.replace(".base_layer.", ".")] = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
    return out


def fingerprint_parts(model: nn.Module, quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """The base model's identity in parts.

    ``architecture`` (name -> logical shape), ``quantization``, ``values`` (frozen full-precision tensors) and
    ``codes`` (4-bit weights, once quantized).
    """
    return {
        "architecture": {name: list(shape) for name, shape in sorted(_logical_shapes(model).items())},
        "quantization": dict(quantization) if quantization else None,
        "values": frozen_value_digests(model),
        "codes": quantized_code_digests(model),
    }


def codes_pending(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``saved`` has 4-bit code digests that ``current`` cannot be compared with yet (not quantized)."""
    return bool(saved.get("codes")) and not set(saved["codes"]) & set(current.get("codes") or {})


def fingerprint_digest(parts: dict[str, Any]) -> str:
    """A short hex digest of :func:`fingerprint_parts` (stored beside them in checkpoints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why two :func:`fingerprint_parts` differ (one line), or ``None`` when they match.

    Value digests are compared only for tensors present (and loaded) on both sides.
    """
    if saved.get("quantization") != current.get("quantization"):
        return (
            f"it was trained with quantization {saved.get('quantization') or 'none (full precision)'} but this run "
            f"uses {current.get('quantization') or 'none (full precision)'}"
        )
    old, new = saved.get("architecture", {}), current.get("architecture", {})
    if old != new:
        changed = [k for k in old if k in new and list(old[k]) != list(new[k])]
        if changed:
            key = changed[0]
            return (
                f"it was written for a different architecture ({len(changed)} tensors differ in shape, e.g. {key} "
                f"is {tuple(old[key])} there and {tuple(new[key])} here)"
            )
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        detail = f"{len(missing)} tensors missing here, e.g. {missing[0]}" if missing else ""
        detail = detail or f"{len(extra)} tensors it does not have, e.g. {extra[0]}"
        return f"it was written for a different architecture ({detail})"
    old_values, new_values = saved.get("values", {}), current.get("values", {})
    differ = [k for k in old_values if k in new_values and old_values[k] != new_values[k]]
    if differ:
        return f"it was written for a base model with other weights ({len(differ)} tensors differ, e.g. {differ[0]})"
    old_codes, new_codes = saved.get("codes") or {}, current.get("codes") or {}
    differ = [k for k in old_codes if k in new_codes and old_codes[k] != new_codes[k]]
    if differ:
        return (
            f"it was written for a base model with other 4-bit weights ({len(differ)} layers differ, e.g. "
            f"{differ[0]}; a merged or re-quantized copy?)"
        )
    return None
