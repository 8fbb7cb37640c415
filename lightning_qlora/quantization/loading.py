"""Quantize-on-load: build linear layers as empty 4-bit shells and quantize each weight as it arrives.

Under :func:`deferred_4bit_linears`, every ``nn.Linear(...)`` constructed becomes a :class:`Deferred4bitLinear`
whose weight lives on the meta device (no memory). ``load_state_dict`` (or :func:`load_safetensors`, which streams
one tensor at a time) quantizes each incoming full-precision weight straight onto the target device, so the device
never holds more than the 4-bit model plus one full-precision matrix. Layers named in the skip list (the output
head) keep their loaded weight in full precision; :func:`finalize_deferred` turns them back into ``nn.Linear``.
:func:`materialize_random` fills the shells from ``N(0, std)`` instead of a checkpoint, one layer at a time, so a
random-weight model of any size is built straight into 4 bits (a 70B model never exists in bf16).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.quantization.nf4 import QuantizationConfig, is_skipped, make_params4bit
from lightning_qlora.utils.imports import bitsandbytes

_QUANT_STATE_MARKER = "weight.quant_state."


def _deferred_class() -> type:
    from lightning_qlora.quantization.nf4_linear import NF4Linear

    class Deferred4bitLinear(NF4Linear):
        """An ``NF4Linear`` created empty (meta weight) that quantizes the weight it is loaded with."""

        def __init__(
            self, in_features: int, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None
        ) -> None:
            config: QuantizationConfig = _ACTIVE_CONFIG[-1]
            target = torch.device(device) if device is not None else torch.get_default_device()
            with torch.device("meta"):
                super().__init__(
                    in_features,
                    out_features,
                    bias=bias,
                    compute_dtype=config.compute_dtype,
                    compress_statistics=config.double_quant,
                    quant_type=config.quant_type,
                    quant_storage=config.quant_storage,
                )
            self.quantization_config = config
            self.target_device = target if target.type != "meta" else torch.device("cpu")
            self.bias_dtype = dtype or torch.get_default_dtype()
            self.keep_full_precision = False

        @property
        def is_loaded(self) -> bool:
            return self.weight.device.type != "meta"

        @property
        def is_tied(self) -> bool:
            """Whether the weight was replaced by a real full-precision tensor (tied to an embedding) before loading."""
            return self.weight.device.type != "meta" and not isinstance(self.weight, _params4bit_class())

        def _load_from_state_dict(
            self,
            state_dict: dict,
            prefix: str,
            local_metadata: dict,
            strict: bool,
            missing_keys: list,
            unexpected_keys: list,
            error_msgs: list,
        ) -> None:
            key = prefix + "weight"
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
            else:
                if prefix and is_skipped(prefix[:-1], self.quantization_config.skip_modules):
                    self.keep_full_precision = True
                self._load_weight(state_dict[key], _quant_stats(state_dict, prefix), error_msgs, key)
            if self.bias is not None:
                if prefix + "bias" in state_dict:
                    bias = state_dict[prefix + "bias"]
                    self.bias = nn.Parameter(bias.to(self.target_device, self.bias_dtype), requires_grad=False)
                elif strict:
                    missing_keys.append(prefix + "bias")

        def _load_weight(self, tensor: torch.Tensor, stats: dict, error_msgs: list, key: str) -> None:
            bnb = bitsandbytes()

            if stats:  # already 4-bit (a bitsandbytes/peft/HF state dict): take the bits as they are
                self.weight = bnb.nn.Params4bit.from_prequantized(
                    data=tensor, quantized_stats=stats, requires_grad=False, device=self.target_device, module=self
                )
            elif tuple(tensor.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(tensor.shape)}, "
                    f"the layer expects {(self.out_features, self.in_features)}"
                )
                return
            elif self.is_tied:
                # the weight is shared with an embedding (a tied output head): fill it in place, never quantize it
                with torch.no_grad():
                    self.weight.copy_(tensor)
                self.keep_full_precision = True
                return
            elif self.keep_full_precision:
                self.weight = nn.Parameter(tensor.to(self.target_device, self.bias_dtype), requires_grad=False)
                return
            else:
                # in the model's dtype first, as transformers' from_pretrained(dtype=...) does before bitsandbytes:
                # the same codes as HF's path, and a quant_state that dequantizes straight to that dtype
                if tensor.is_floating_point() and tensor.dtype != self.bias_dtype:
                    tensor = tensor.to(self.bias_dtype)
                self.weight = make_params4bit(tensor, self.quantization_config, self.target_device)
                self.weight.module = self
            self.quant_state = self.weight.quant_state

    return Deferred4bitLinear


def _params4bit_class() -> type:
    bnb = bitsandbytes()

    return bnb.nn.Params4bit


def _quant_stats(state_dict: dict, prefix: str) -> dict:
    head = prefix + "weight."
    return {k[len(head) :]: v for k, v in state_dict.items() if k.startswith(head)}


_DEFERRED_CLS: type | None = None
_ACTIVE_CONFIG: list[QuantizationConfig] = []


def deferred_linear_class() -> type:
    """The ``Deferred4bitLinear`` class (bitsandbytes is imported on first use)."""
    global _DEFERRED_CLS
    if _DEFERRED_CLS is None:
        _DEFERRED_CLS = _deferred_class()
    return _DEFERRED_CLS


def _linear_factory(*args: Any, **kwargs: Any) -> nn.Module:
    return deferred_linear_class()(*args, **kwargs)


@contextlib.contextmanager
def deferred_4bit_linears(config: QuantizationConfig) -> Iterator[None]:
    """Inside this context ``torch.nn.Linear(...)`` builds an empty 4-bit shell that quantizes on load."""
    import torch.nn.modules.linear as linear_module

    cls = deferred_linear_class()
    originals = (nn.Linear, linear_module.Linear)
    _ACTIVE_CONFIG.append(config)
    nn.Linear = cls  # type: ignore[misc]
    linear_module.Linear = cls  # type: ignore[misc]
    try:
        yield
    finally:
        nn.Linear, linear_module.Linear = originals  # type: ignore[misc]
        _ACTIVE_CONFIG.pop()


def deferred_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, shell)`` for every deferred 4-bit shell in ``model``."""
    if _DEFERRED_CLS is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _DEFERRED_CLS)]


def mark_full_precision(model: nn.Module, skip_modules: Sequence[str]) -> None:
    """Make the shells named in ``skip_modules`` keep their loaded weight unquantized."""
    for name, shell in deferred_layers(model):
        if is_skipped(name, skip_modules):
            shell.keep_full_precision = True


def finalize_deferred(model: nn.Module) -> list[str]:
    """Swap every shell that holds a full-precision weight (skipped or tied heads) for a plain ``nn.Linear``.

    Shells nothing was loaded into are materialised with ``nn.Linear``'s random init and quantized, as a model
    built outside the context would be. Returns the names of the shells still empty before this call.
    """
    bnb = bitsandbytes()

    empty = []
    for name, shell in deferred_layers(model):
        weight = shell.weight
        if weight.device.type == "meta":
            empty.append(name)
            fresh = nn.Linear(
                shell.in_features, shell.out_features, bias=shell.bias is not None, device=shell.target_device
            )
            if shell.keep_full_precision:
                fresh.weight.requires_grad_(shell.weight.requires_grad)  # frozen unless e.g. LoRA's trainable_modules
                if shell.bias is not None:
                    fresh.bias.requires_grad_(shell.bias.requires_grad)
                model.set_submodule(name, fresh)
                continue
            shell.weight = make_params4bit(fresh.weight.data, shell.quantization_config, shell.target_device)
            shell.weight.module = shell
            shell.quant_state = shell.weight.quant_state
            if shell.bias is not None:
                shell.bias = nn.Parameter(fresh.bias.data, requires_grad=False)
        elif not isinstance(weight, bnb.nn.Params4bit):
            plain = nn.Linear(shell.in_features, shell.out_features, bias=shell.bias is not None, device="meta")
            plain.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
            if shell.bias is not None:
                plain.bias = shell.bias
            model.set_submodule(name, plain)
    return empty


def materialize_random(model: nn.Module, std: float, generator: torch.Generator | None = None) -> list[str]:
    """Fill every empty shell with a ``N(0, std²)`` weight (zero bias), quantizing each before drawing the next.

    Only one full-precision matrix exists at a time (drawn on the shell's target device in its dtype), so peak memory
    is the 4-bit model plus one layer. Shells in the skip list or marked full precision (the output head) keep their
    draw unquantized; call :func:`finalize_deferred` afterwards to turn those into ``nn.Linear``.

    Args:
        model: a model built under :func:`deferred_4bit_linears`.
        std: standard deviation of the weights (transformers uses ``config.initializer_range``).
        generator: random generator on the shells' device (default: torch's global one for that device).

    Returns:
        The names of the shells that were filled.

    Raises:
        ValueError: if ``std`` is not a positive number.
    """
    if not std > 0:
        raise ValueError(f"random init std={std!r} must be a positive number (e.g. config.initializer_range=0.02)")
    filled = []
    for name, shell in deferred_layers(model):
        if shell.weight.device.type != "meta":
            continue
        if is_skipped(name, shell.quantization_config.skip_modules):
            shell.keep_full_precision = True  # as loading a checkpoint does (the output head)
        weight = torch.empty(shell.out_features, shell.in_features, device=shell.target_device, dtype=shell.bias_dtype)
        weight.normal_(0.0, std, generator=generator)
        errors: list[str] = []
        shell._load_weight(weight, {}, errors, f"{name}.weight")
        del weight
        if shell.bias is not None:
            shell.bias = nn.Parameter(
                torch.zeros(shell.out_features, device=shell.target_device, dtype=shell.bias_dtype), requires_grad=False
            )
        filled.append(name)
    return filled


def load_safetensors(
    model: nn.Module,
    files: Sequence[str | os.PathLike],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    key_map: dict[str, str] | None = None,
) -> list[str]:
    """Stream safetensors shards into ``model`` one module at a time, quantizing shells as they fill.

    Non-shell parameters are assigned (meta tensors are replaced) on ``device`` in ``dtype``. Returns the model's
    state-dict keys nothing was loaded into.

    Raises:
        ValueError: if a file is missing, truncated or not safetensors, or a tensor's shape does not fit the model.
    """
    from safetensors import safe_open

    expected = set(model.state_dict().keys())
    module_names = {n for n, _ in model.named_modules()}
    loaded: set[str] = set()
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(old) -> (old, new), to keep tied weights tied
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"weights file {path} does not exist; check the model directory")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"{path} is not a readable safetensors file ({err}); re-download or re-export it") from err
        with handle:
            groups: dict[str, list[str]] = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                name = key_map.get(key, key) if key_map else key
                groups.setdefault(_owner(name, module_names), []).append(key)
            for owner, keys in groups.items():
                module = model.get_submodule(owner) if owner else model
                local = {}
                for key in keys:
                    name = key_map.get(key, key) if key_map else key
                    local[name[len(owner) + 1 :] if owner else name] = handle.get_tensor(key)
                _load_into(module, local, device, dtype, f"{owner}." if owner else "", str(path), replaced)
                loaded.update(f"{owner}.{k}" if owner else k for k in local)
    _retie(model, replaced)
    empty = {f"{name}.weight" for name, shell in deferred_layers(model) if shell.weight.device.type == "meta"}
    return sorted(k for k in (expected - loaded) | empty if _QUANT_STATE_MARKER not in k)


def _retie(model: nn.Module, replaced: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Point every other reference to a replaced parameter (a tied output head) at its replacement."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in replaced and replaced[id(param)][0] is param:
                module._parameters[name] = replaced[id(param)][1]


def _owner(key: str, module_names: set[str]) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in module_names:
            return candidate
    return ""


def _load_into(
    module: nn.Module,
    local: dict,
    device: Any,
    dtype: Any,
    prefix: str,
    source: str,
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] | None = None,
) -> None:
    if _DEFERRED_CLS is not None and isinstance(module, _DEFERRED_CLS):
        errors: list[str] = []
        full = {prefix + k: v for k, v in local.items()}
        module._load_from_state_dict(full, prefix, {}, False, [], [], errors)
        if errors:
            raise ValueError(f"{source}: {errors[0]}; the checkpoint does not belong to this model architecture")
        return
    own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    for name, tensor in local.items():
        if name not in own:
            continue  # unexpected keys (e.g. rotary caches) are ignored, as transformers does
        current = own[name]
        if current.shape != tensor.shape:
            raise ValueError(
                f"{source}: {prefix}{name} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(current.shape)}; the checkpoint does not belong to this model architecture"
            )
        target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else current.dtype
        value = tensor.to(device=device, dtype=target_dtype)
        if isinstance(current, nn.Parameter):
            new = nn.Parameter(value, requires_grad=current.requires_grad)
            setattr(module, name, new)
            if replaced is not None:
                replaced[id(current)] = (current, new)
        else:
            module._buffers[name] = value
