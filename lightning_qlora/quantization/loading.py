"""Quantize-on-load for models built in Python: linear layers become empty 4-bit shells as they are created.

Under :func:`deferred_4bit_linears` (``NF4Precision.module_init_context``, ``trainer.init_module()``, random init),
every linear-like module registered on a parent (``nn.Linear``, any subclass, GPT-2's ``Conv1D``) is swapped for a
shell (:mod:`lightning_qlora.quantization.shells`) whose weight lives on the meta device, through torch's public
module-registration hook for the duration of the block: no class is patched, so subclasses defined before or after
are handled alike, and the layer just built is freed at once (peak: the 4-bit model plus one layer).
``load_state_dict`` then quantizes each incoming weight straight onto the target device. Layers named in the skip
list (the output head) keep their loaded weight in full precision; :func:`finalize_deferred` turns them back into
``nn.Linear``. :func:`materialize_random` fills the shells from ``N(0, std)`` instead of a checkpoint, one layer at
a time, so a random-weight model of any size is built straight into 4 bits (a 70B model never exists in bf16).
Checkpoints are loaded by transformers itself (:mod:`lightning_qlora.quantization.hf_quantizer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from lightning_qlora.quantization.linear_probe import is_linear_like
from lightning_qlora.quantization.nf4 import QuantizationConfig, is_skipped, make_params4bit
from lightning_qlora.quantization.shells import is_router, is_shell, make_shell
from lightning_qlora.utils.imports import bitsandbytes


@contextlib.contextmanager
def deferred_4bit_linears(config: QuantizationConfig, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside this block every linear-like module registered on a parent becomes an empty 4-bit shell.

    Modules built on the meta device are left alone (whoever builds on meta loads them: transformers'
    ``from_pretrained`` with :class:`~lightning_qlora.quantization.hf_quantizer.QLoRAQuantizer`).

    Args:
        config: the 4-bit settings.
        device: where weights are quantized (default: the device each layer was built on).
    """

    def to_shell(parent: nn.Module, name: str, module: nn.Module | None) -> nn.Module | None:
        if module is None or not is_linear_like(module) or is_shell(module) or is_router(name, module):
            return None
        if module.weight.device.type == "meta":
            return None
        return make_shell(module, config, device if device is not None else module.weight.device)

    handle = register_module_module_registration_hook(to_shell)
    try:
        yield
    finally:
        handle.remove()


def deferred_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, shell)`` for every quantize-on-load shell in ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_shell(m)]


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
        shell.load_weight(weight, {}, errors, f"{name}.weight")
        del weight
        if shell.bias is not None:
            shell.bias = nn.Parameter(
                torch.zeros(shell.out_features, device=shell.target_device, dtype=shell.bias_dtype), requires_grad=False
            )
        filled.append(name)
    return filled
