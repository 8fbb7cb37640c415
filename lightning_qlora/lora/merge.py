"""Fold LoRA adapters into their base weights and save the merged model as a Hugging Face checkpoint.

``W = dequant(W0) + scaling·B·A`` is computed in float64 per layer, then stored either as a plain ``nn.Linear``
(bf16 by default) or re-quantized to NF4. :class:`MergeReport` records how far each stored weight is from that
exact sum (bf16 rounding, or NF4 re-quantization error) next to the size of the update itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lightning_qlora.lora.experts import expert_lora_modules
from lightning_qlora.lora.layer import LoRALinear, lora_modules
from lightning_qlora.quantization.experts import (
    expert_stacks,
    expert_weight,
    quantize_stack,
    stack_is_transposed,
    stack_names,
    stack_shape,
)
from lightning_qlora.quantization.linear_probe import conv1d_class
from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, is_4bit_linear, linear_to_4bit
from lightning_qlora.utils.atomic import atomic_directory
from lightning_qlora.utils.dtypes import DTypeLike, dtype_name, to_dtype

WEIGHTS_NAME = "model.safetensors"
_CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


@dataclass
class MergedLayer:
    """What merging did to one layer."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    """Largest ``|stored weight - (dequant(W0) + scaling·B·A)|``, the exact sum computed in float64."""
    max_abs_delta: float
    """Largest ``|scaling·B·A|``: an error of this size would wipe out the adapter."""


@dataclass
class MergeReport:
    """Per-layer accuracy of a merge (see :func:`merge_lora`)."""

    target: str
    """``"bf16"`` (plain weights) or ``"nf4"`` (re-quantized)."""
    dtype: str
    """Storage of the merged weights: a torch dtype name, or the 4-bit type (``"nf4"``)."""
    layers: list[MergedLayer] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        """Worst error over all layers."""
        return max((layer.max_abs_error for layer in self.layers), default=0.0)

    @property
    def errors(self) -> dict[str, float]:
        """``{layer name: max abs error}``."""
        return {layer.name: layer.max_abs_error for layer in self.layers}

    def table(self) -> str:
        """A fixed-width text table, one row per layer plus a summary line."""
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'max|err|':>10}  {'max|delta|':>10}  {'err/delta':>9}"]
        for layer in self.layers:
            ratio = layer.max_abs_error / layer.max_abs_delta if layer.max_abs_delta else float("inf")
            shape = "x".join(map(str, layer.shape))
            lines.append(
                f"{layer.name:<{width}}  {shape:>11}  {layer.max_abs_error:>10.3e}  {layer.max_abs_delta:>10.3e}"
                f"  {ratio:>9.3f}"
            )
        lines.append(
            f"merged {len(self.layers)} layers to {self.target} ({self.dtype}); max error {self.max_abs_error:.3e}"
        )
        return "\n".join(lines)


def _quantization_like(layer: nn.Module) -> QuantizationConfig:
    """NF4 with the settings a 4-bit layer was quantized with (blocksize, double quant, compute/storage dtypes)."""
    weight = layer.weight
    state = weight.quant_state
    return QuantizationConfig(
        quant_type="nf4",
        double_quant=bool(state.nested),
        blocksize=state.blocksize,
        compute_dtype=getattr(layer, "compute_dtype", None) or state.dtype,
        quant_storage=getattr(weight, "quant_storage", torch.uint8),
    )


def merge_lora(
    model: nn.Module,
    target: Literal["bf16", "nf4"] = "bf16",
    quantization: QuantizationConfig | None = None,
    dtype: DTypeLike = torch.bfloat16,
) -> MergeReport:
    """Replace every :class:`LoRALinear` in ``model`` by one layer holding ``W0 + scaling·B·A``, in place.

    ``W0`` is dequantized when the base is 4-bit. With ``target="bf16"`` the merged weight (and the bias) is stored
    as a plain frozen ``nn.Linear`` in ``dtype``; with ``target="nf4"`` it is re-quantized into an ``NF4Linear``
    with ``quantization`` (default: NF4 with the base layer's own blocksize, double quant and compute dtype, or
    :class:`QuantizationConfig` defaults for a full-precision base), quantizing from the dtype ``W0`` came from.
    The exact sum is computed in float64 on the weight's device and each layer's error is measured against it.
    Dropout is dropped (merged weights are for inference). Only adapted layers change: cast the rest of the model
    (parameters only, as ``from_pretrained(dtype=...)`` does) before running it if it is in another dtype.

    Mixture-of-experts stacks with adapters (:class:`~lightning_qlora.lora.experts.ExpertLoRA`) are merged the same
    way, expert by expert (``Wₑ + scaling·Bₑ·Aₑ``, transposed for stacks stored ``in × out``), and their adapters
    removed; with ``target="bf16"`` every 4-bit stack becomes plain, adapted or not (a merged model holds no codes).

    Args:
        model: a model with LoRA layers.
        target: ``"bf16"`` for a full-precision merge (dtype set by ``dtype``), ``"nf4"`` to re-quantize.
        quantization: 4-bit settings for ``target="nf4"``; ignored for ``"bf16"``.
        dtype: storage dtype for ``target="bf16"`` (bf16 default; fp32/fp16 allowed).

    Returns:
        A :class:`MergeReport` with one row per merged layer (and expert stack).

    Raises:
        ValueError: if ``target`` is unknown or the model has no LoRA layers.
    """
    if target not in ("bf16", "nf4"):
        raise ValueError(f"merge target={target!r} is not supported; use 'bf16' (plain weights) or 'nf4' (4-bit)")
    dtype = to_dtype(dtype)
    layers = list(lora_modules(model))
    layers = [(n, m) for n, m in layers if not any(n.startswith(f"{o}.") for o, _ in layers)]  # outermost only
    if not layers and not expert_lora_modules(model):
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge; inject_lora or import_peft first")
    report = MergeReport(target=target, dtype=dtype_name(dtype))
    for name, layer in layers:
        merged, error, delta = _merge_layer(layer, target, quantization, dtype)
        report.layers.append(MergedLayer(name, (layer.out_features, layer.in_features), error, delta))
        if target == "nf4":
            report.dtype = merged.weight.quant_state.quant_type  # "nf4", or "fp4" when asked for explicitly
        model.set_submodule(name, merged)
    report.layers += _merge_experts(model, target, quantization, dtype)
    return report


def _merge_experts(
    model: nn.Module, target: str, quantization: QuantizationConfig | None, dtype: torch.dtype
) -> list[MergedLayer]:
    """Fold each expert stack's adapters into it (see :func:`merge_lora`); plain stacks for ``"bf16"``."""
    rows = []
    for name, module in expert_stacks(model, strict=False):
        adapters = getattr(module, "lora_experts", None)
        for stack in stack_names(module):
            param, lora = getattr(module, stack), adapters[stack] if adapters and stack in adapters else None
            state = getattr(param, "quant_state", None)
            if lora is None and (target == "nf4" or state is None):
                continue  # nothing to fold, nothing to dequantize
            with torch.no_grad():
                experts = stack_shape(param)[0]
                exact = torch.stack([expert_weight(param, e, torch.float64) for e in range(experts)])
                delta = torch.zeros_like(exact)
                if lora is not None:
                    pairs = [lora.pair(e) for e in range(experts)]
                    delta = torch.stack([b.double() @ a.double() for a, b in pairs]).to(exact.device) * lora.scaling
                    delta = delta.transpose(1, 2) if stack_is_transposed(module) else delta
                exact += delta
                if target == "bf16":
                    merged = nn.Parameter(exact.to(dtype), requires_grad=False)
                else:
                    config = quantization or (_stack_quantization(param) if state is not None else QuantizationConfig())
                    source = state.dtype if state is not None else param.dtype  # what the stack was quantized from
                    merged = quantize_stack(exact.to(source), config, param.device)
                setattr(module, stack, merged)
                back = torch.stack([expert_weight(merged, e, torch.float64) for e in range(experts)])
                error = (back - exact).abs().max().item()
            rows.append(MergedLayer(f"{name}.{stack}", tuple(exact.shape), error, delta.abs().max().item()))
        if adapters is not None:
            del module.lora_experts
    return rows


def _stack_quantization(param: torch.Tensor) -> QuantizationConfig:
    """NF4 with the settings a 4-bit expert stack was quantized with."""
    state = param.quant_state
    return QuantizationConfig(quant_type="nf4", double_quant=bool(state.nested), blocksize=state.blocksize,
                              compute_dtype=state.dtype)  # fmt: skip


def _merge_layer(
    layer: LoRALinear, target: str, quantization: QuantizationConfig | None, dtype: torch.dtype
) -> tuple[nn.Module, float, float]:
    base = layer.base_layer
    if isinstance(base, LoRALinear):  # stacked adapters: fold the inner one first
        base, _, _ = _merge_layer(base, "bf16", None, torch.float32)
    conv1d = conv1d_class()
    plain_conv1d = conv1d is not None and isinstance(base, conv1d)  # GPT-2 style: weight stored in x out
    source_cls = type(base) if plain_conv1d else getattr(base, "source_cls", None)
    with torch.no_grad():
        delta = layer.delta_weight(torch.float64).to(base.weight.device)
        w0 = dequantize_weight(base, torch.float64)
        exact = (w0.t() if plain_conv1d else w0) + delta
        bias = None if base.bias is None else base.bias.detach()
        if target == "bf16" and conv1d is not None and source_cls is conv1d:  # saved where the model expects it
            merged: nn.Module = conv1d(layer.out_features, layer.in_features).to(device=exact.device, dtype=dtype)
            merged.weight.copy_(exact.t())
            merged.bias.copy_(bias if bias is not None else torch.zeros_like(merged.bias))
            stored = dequantize_weight(merged, torch.float64).t()
        elif target == "bf16":
            merged = nn.Linear(
                layer.in_features, layer.out_features, bias=bias is not None, device=exact.device, dtype=dtype
            )
            merged.weight.copy_(exact)
            if bias is not None:
                merged.bias.copy_(bias)
            stored = dequantize_weight(merged, torch.float64)
        else:
            four_bit = is_4bit_linear(base)
            config = quantization or (_quantization_like(base) if four_bit else QuantizationConfig())
            source = base.weight.quant_state.dtype if four_bit else base.weight.dtype  # what W0 was quantized from
            plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
            plain.weight = nn.Parameter(exact.to(source), requires_grad=False)
            if bias is not None:
                plain.bias = nn.Parameter(bias.clone(), requires_grad=False)
            merged = linear_to_4bit(plain, config, exact.device)
            if source_cls is not None:
                merged.source_cls = source_cls  # a 4-bit Conv1D stays an out x in layer, as transformers loads it
            stored = dequantize_weight(merged, torch.float64)
        error = (stored - exact).abs().max().item()
    merged.requires_grad_(False)
    merged.train(layer.training)
    return merged, error, delta.abs().max().item()


def _tied_pairs(model: nn.Module) -> dict[str, str]:
    """``{target: source}`` parameter names the model's config says are tied (transformers' mapping)."""
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    if getter is not None:
        try:
            return dict(getter(all_submodels=True))
        except Exception:  # a custom model with a malformed mapping: treat as untied
            return {}
    return {}


@contextlib.contextmanager
def _merged_config(model: nn.Module) -> Iterator[None]:
    """Describe the merged model in its config while transformers saves it; the live config is restored after.

    No ``quantization_config``; ``dtype`` = the dtype holding most parameters; ``tie_word_embeddings=False`` when an
    adapter on a tied head made the head differ from the embeddings (transformers would otherwise save only one). The
    model's ``hf_quantizer`` (set when it was loaded in 4 bits) is lifted too: its layers are plain now, and
    transformers refuses to save a model whose quantizer is not serializable.
    """
    config = model.config
    saved = dict(config.__dict__)
    quantizer = model.__dict__.get("hf_quantizer")
    if quantizer is not None:
        model.hf_quantizer = None
    tied = _tied_pairs(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    if any(t in params and s in params and params[t] is not params[s] for t, s in tied.items()):
        config.tie_word_embeddings = False
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    if counts:
        config.dtype = dtype_name(max(counts, key=lambda d: counts[d]))
    try:
        yield
    finally:
        config.__dict__.clear()
        config.__dict__.update(saved)
        if quantizer is not None:
            model.hf_quantizer = quantizer


def save_merged_safetensors(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a merged (plain-weight) model as ``model.safetensors`` + ``config.json`` that ``from_pretrained`` loads.

    A transformers model is written by its own ``save_pretrained`` (names, tied weights, config and generation
    config as transformers writes them); if merging broke a tie the config says exists (an adapter on a tied head),
    the saved config gets ``tie_word_embeddings=False``. The config's ``dtype`` becomes the dtype holding most
    parameters (``from_pretrained`` loads everything in it) and any ``quantization_config`` is dropped. Any other
    module is written with safetensors' ``save_model`` (shared tensors stored once). The folder is replaced atomically
    (:func:`lightning_qlora.utils.atomic.atomic_directory`); stale checkpoint files in it are not carried over.

    Args:
        model: a model without LoRA or 4-bit layers (call ``merge_lora(model, "bf16")`` first).
        directory: output folder (created or replaced).

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: if the model still has LoRA or 4-bit layers.
    """
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or getattr(module, "lora_experts", None) is not None:
            raise ValueError(f"{name} has LoRA adapters; call merge_lora(model, 'bf16') before save_merged_safetensors")
        if any(getattr(getattr(module, s), "quant_state", None) is not None for s in stack_names(module)):
            raise ValueError(f"{name} holds 4-bit expert stacks; merge_lora(model, 'bf16') makes them plain first")
        if is_4bit_linear(module):
            raise ValueError(
                f"{name} is a 4-bit layer; save_merged_safetensors writes plain weights and merge_lora(model, 'bf16') "
                "only converts layers that have an adapter (target them all, or merge to a 4-bit checkpoint instead)"
            )

    def owned(name: str) -> bool:
        return name in _CHECKPOINT_FILES or (name.startswith(("model", "pytorch_model")) and "." in name)

    with atomic_directory(directory, owned) as tmp:
        if hasattr(model, "save_pretrained"):
            with _merged_config(model):
                model.save_pretrained(tmp, safe_serialization=True)
        else:  # a plain nn.Module: safetensors stores shared tensors once
            from safetensors.torch import save_model

            save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(directory).expanduser().resolve()


__all__ = ["MergeReport", "MergedLayer", "merge_lora", "save_merged_safetensors"]
