"""Helpers over ``nn.Module`` trees that every layer of the package needs: the wrapped network, its blocks, names."""

from __future__ import annotations

from torch import nn

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def model_root(module: nn.Module) -> nn.Module:
    """The wrapped network: ``module.model`` when it is a module (a LightningModule around HF), else ``module``."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


def unwrapped_name(name: str) -> str:
    """A parameter name without the prefixes FSDP1, activation checkpointing and ``torch.compile`` insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def decoder_blocks(root: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks of ``root``: its largest ``nn.ModuleList`` (a transformer's layers), ``None`` if none."""
    return max((m for m in root.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)


def require_decoder_blocks(root: nn.Module, purpose: str) -> nn.ModuleList:
    """:func:`decoder_blocks`, or one line naming what needed them.

    Raises:
        ValueError: if ``root`` has no ``ModuleList`` (``purpose`` names what needed the blocks).
    """
    blocks = decoder_blocks(root)
    if blocks is None:
        raise ValueError(f"{purpose}: {type(root).__name__} has no ModuleList of blocks; turn {purpose} off for it")
    return blocks


def trainable_names(module: nn.Module) -> set[str]:
    """Unwrapped names of the parameters that require grad (adapters and any module kept trainable)."""
    return {unwrapped_name(name) for name, p in module.named_parameters() if p.requires_grad}
