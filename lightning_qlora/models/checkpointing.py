"""Activation (gradient) checkpointing that really turns on, fully or selectively.

``full`` keeps only each block's input and recomputes the whole block in backward. ``selective`` also keeps the
attention output (the SDPA kernels' results), so backward recomputes the cheap elementwise and projection work but
never the attention itself: a little more memory (B·T·hidden per block) for one attention forward less per block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lightning_qlora.utils.modules import require_decoder_blocks

CheckpointMode = Literal["full", "selective"]


def _attention_ops() -> set[Any]:
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


ATTENTION_OPS = _attention_ops()
"""The SDPA kernels whose outputs ``selective`` checkpointing saves instead of recomputing."""


def save_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpointing policy: keep attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: CheckpointMode) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` implementing ``mode`` (non-reentrant).

    Raises:
        ValueError: for an unknown mode.
    """
    if mode == "full":
        return {"use_reentrant": False}
    if mode == "selective":
        return {
            "use_reentrant": False,
            "context_fn": functools.partial(create_selective_checkpoint_contexts, save_attention_policy),
        }
    raise ValueError(f"gradient checkpointing mode {mode!r} is not supported; use 'full' or 'selective'")


def enable_gradient_checkpointing(root: nn.Module, mode: CheckpointMode = "full", every_n_layers: int = 1) -> str:
    """Turn on activation checkpointing for ``root``; returns how (``"transformers"`` or ``"blocks"``).

    transformers models use their own checkpointing (and are put in train mode: ``from_pretrained`` returns eval
    mode, which silently disables it); other models get each block of their largest ``ModuleList`` wrapped.

    Args:
        root: the network.
        mode: ``"full"`` or ``"selective"`` (also keep attention outputs).
        every_n_layers: checkpoint one block in this many (the others keep all activations).

    Raises:
        ValueError: for a bad mode or ``every_n_layers``, or a model without a ``ModuleList`` of blocks.
    """
    kwargs = checkpoint_kwargs(mode)
    if every_n_layers < 1:
        raise ValueError(f"gradient checkpointing every_n_layers={every_n_layers} must be >= 1")
    if hasattr(root, "gradient_checkpointing_enable") and getattr(root, "supports_gradient_checkpointing", False):
        if hasattr(root, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
            root.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
        elif every_n_layers == 1:
            root.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(
                "gradient checkpointing every_n_layers > 1 needs transformers with activation_checkpointing"
            )
        root.train()
        return "transformers"
    # Not torch's checkpoint_wrapper: it would insert ``_checkpoint_wrapped_module.`` into every parameter name
    # (adapter names in exports, checkpoints and fingerprints); wrapping each block's forward keeps the names.
    for index, block in enumerate(require_decoder_blocks(root, "gradient_checkpointing")):
        if index % every_n_layers == 0 and not getattr(block.forward, "_checkpointed", False):
            block.forward = _checkpointed(block.forward, kwargs)
    return "blocks"


def _checkpointed(forward: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **call_kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, **kwargs, **call_kwargs)
        return forward(*args, **call_kwargs)

    run._checkpointed = True  # type: ignore[attr-defined]
    return run
