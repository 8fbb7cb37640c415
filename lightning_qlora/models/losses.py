"""Chunked next-token cross-entropy that never holds fp32 logits for the whole batch.

``loss = mean over valid t of (logsumexp(h_t·Wᵀ) - h_t·w_{y_{t+1}})`` with labels shifted as transformers does
(position t predicts label t+1; ``-100`` is ignored). The head matmul, the fp32 softmax and the gradient
``∂loss/∂logits = (softmax - onehot) / n_valid`` run over ``chunk_size`` tokens at a time, and each chunk's gradients
``grad_h = G·W`` and ``grad_W += Gᵀ·h`` are formed right away (in forward, when gradients are wanted), so backward
only scales them by the upstream gradient: logits are computed once, never kept, and at most ``chunk_size × V``
of them exist at any time. Ignored tokens are dropped before the head matmul, so prompt tokens cost nothing.

:func:`causal_lm_loss` applies it to a transformers causal LM (decoder -> hidden states -> output head), falling back
to the model's own loss (with the reason) when the model post-processes its logits or has no plain linear head.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# config attributes that make a causal LM rescale or cap its logits after the head (Cohere, Granite, Gemma 2/3, ...)
_LOGIT_POSTPROCESSING = re.compile(r"(logit|output_multiplier)")
_NOT_POSTPROCESSING = re.compile(r"(attn|attention|router|init|to_keep|temperature|output_.*logits$)")


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden·weightᵀ (+ bias)`` against ``targets``, one chunk of rows at a time."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
        want_grads: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        """Loss over rows of ``hidden`` (N, H) whose ``targets`` (N,) are not ``-100``; grads formed on the way."""
        need_h, need_w, need_b = want_grads
        device = hidden.device
        with torch.autocast(device.type, enabled=False):
            valid = valid_rows(targets)
            count = valid.numel()
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            wide = softmax_dtype(compute_dtype)
            total = torch.zeros((), dtype=wide, device=device)
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=wide, device=device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=wide, device=device) if need_b else None
            for rows, h, logits, y in head_chunks(hidden, w, b, targets, valid, chunk_size, compute_dtype):
                picked = logits.gather(1, y.unsqueeze(1)).squeeze(1)
                lse, sums = exp_shifted_(logits)
                total += (lse - picked).sum()
                if not (need_h or need_w or need_b):
                    del logits  # before the next chunk's logits exist
                    continue
                g = logits.mul_(sums.mul_(count).reciprocal_())  # softmax / n_valid, in place over the logits
                del logits
                g[torch.arange(rows.numel(), device=device), y] -= 1.0 / count  # ∂loss/∂logits: (softmax - onehot) / n
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(compute_dtype)  # the fp32 chunk is freed here
                if need_h:
                    grad_h.index_copy_(0, rows, (g @ w).to(hidden.dtype))
                if need_w:
                    grad_w += g.t() @ h  # a product in the compute dtype (as autograd's), summed in fp32
                del g
            loss = total / count if count else total * float("nan")  # no valid token: nan, as F.cross_entropy
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Scale the gradients formed in forward by the upstream gradient."""
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if have else None for have in ctx.have]
        grad_h, grad_w, grad_b = grads
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None


def exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite fp32 ``logits`` (N, V) with ``exp(logits - rowmax)``; return ``(logsumexp (N,), row sums (N, 1))``.

    The softmax is then ``logits / sums``: two passes over the vocabulary fewer than ``torch.logsumexp`` followed by
    ``exp(logits - lse)``, and no second vocabulary-sized tensor (a third of the loss's elementwise time on CPU).
    """
    peak = logits.amax(1, keepdim=True)
    sums = logits.sub_(peak).exp_().sum(1, keepdim=True)
    return sums.log().add_(peak).squeeze(1), sums


def valid_rows(targets: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose target is not ``-100`` (the only rows the head runs over)."""
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)


def head_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int,
    compute_dtype: torch.dtype,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(rows, h, logits, targets)`` of each chunk of ``chunk_size`` rows of ``valid``: ``logits = h·Wᵀ + b``.

    ``logits`` are fp32 (fp64 for an fp64 head). ``weight``/``bias`` come already in ``compute_dtype`` (cast once
    by the caller); ``h`` is the chunk's hidden rows in ``compute_dtype`` and ``logits`` ``(chunk, V)`` the only
    vocabulary-sized tensor, to be freed before the next.
    """
    for start in range(0, valid.numel(), chunk_size):
        rows = valid[start : start + chunk_size]
        h = hidden.index_select(0, rows).to(compute_dtype)
        yield rows, h, at_least_fp32(F.linear(h, weight, bias)), targets.index_select(0, rows)


def softmax_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype logits, the softmax and the sums over them use: fp32, or fp64 for an fp64 head."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in :func:`softmax_dtype` (fp32, or as they are when fp64: an fp64 model's softmax stays fp64)."""
    return logits.to(softmax_dtype(logits.dtype))


def head_compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: the autocast dtype when autocast is on, else ``hidden``'s (as the model's own head)."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def check_chunk_size(chunk_size: Any) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` (tokens per chunk) is a positive int."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (tokens per chunk, e.g. 4096)")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    bias: torch.Tensor | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not ``-100``, in chunks of tokens.

    Matches ``F.cross_entropy(head(hidden).float().flatten(0, 1)[...], shifted_labels, ignore_index=-100)`` (the
    transformers causal-LM loss): the head matmul runs in the autocast dtype when autocast is on (else in
    ``hidden``'s dtype), the softmax in fp32.

    Args:
        hidden: final hidden states, ``(B, T, H)`` (or ``(N, H)`` with ``shift=False``).
        weight: output head weight, ``(V, H)``.
        labels: token ids ``(B, T)`` (``(N,)`` with ``shift=False``), ``-100`` where no loss is taken.
        chunk_size: tokens per chunk; peak extra memory is about ``chunk_size × V`` fp32 values.
        bias: output head bias ``(V,)``, if any.
        shift: shift labels left by one within each sequence (position t predicts label t+1), as transformers does.

    Returns:
        The scalar mean loss (fp32; fp64 for an fp64 head); ``nan`` when no token is valid, as
        ``F.cross_entropy`` gives.

    Raises:
        ValueError: on a non-positive ``chunk_size`` or shapes that do not fit together.
    """
    check_chunk_size(chunk_size)
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"chunked_cross_entropy got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
            f"{tuple(labels.shape)}; expected hidden (..., H), weight (V, H) and labels matching hidden's (...)"
        )
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)  # labels[t] <- labels[t+1]; last: ignored
    compute = head_compute_dtype(hidden)
    grad_on = torch.is_grad_enabled()
    want = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1).to(hidden.device)
    return ChunkedCrossEntropy.apply(flat, weight, bias, targets, chunk_size, compute, want)


# ---------------------------------------------------------------------------------------- transformers models
def chunked_loss_unsupported(model: nn.Module) -> str | None:
    """Why :func:`causal_lm_loss` cannot compute ``model``'s loss itself, or ``None`` when it can.

    It can when the model has a separate decoder (``model.base_model``) returning ``last_hidden_state``, a plain
    ``nn.Linear`` output head (``get_output_embeddings()``), the standard causal-LM loss, and no logit scaling or
    soft-capping in its config.
    """
    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return f"{name}'s output head is {type(head).__name__}, not a plain nn.Linear"
    decoder = getattr(model, "base_model", None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        return f"{name} has no separate decoder module (base_model) to take hidden states from"
    if getattr(model, "_loss_function", None) is not None or getattr(model, "loss_type", None) not in (
        None,
        "ForCausalLM",
    ):
        return f"{name} uses a custom loss (loss_type={getattr(model, 'loss_type', None)!r})"
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "text_config", None)] if config is not None else []
    for cfg in (c for c in configs if c is not None):
        for key, value in vars(cfg).items():
            if key == "output_router_logits" and value:
                return f"{name} adds a router auxiliary loss (config.output_router_logits=True)"
            if not _LOGIT_POSTPROCESSING.search(key) or _NOT_POSTPROCESSING.search(key):
                continue
            if value is not None and value is not False and value != 1 and not isinstance(value, (dict, list)):
                return f"{name} post-processes its logits (config.{key}={value!r})"
    return None


def last_hidden_state(outputs: Any) -> torch.Tensor:
    """A decoder's final hidden states: its output's ``last_hidden_state``, or the first element of a tuple."""
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """A transformers causal LM's training loss through :func:`chunked_cross_entropy`.

    Args:
        model: a ``*ForCausalLM`` model that :func:`chunked_loss_unsupported` accepts.
        input_ids: ``(B, T)`` token ids.
        labels: ``(B, T)`` labels (``-100`` ignored), shifted inside as transformers does.
        attention_mask: ``(B, T)`` padding mask, if any.
        chunk_size: tokens per chunk.
        position_ids: ``(B, T)`` positions; packed rows restart at 0 (then give no ``attention_mask``).

    Returns:
        The scalar mean loss over valid next-token targets.

    Raises:
        ValueError: if the model is not supported (the message says why).
    """
    reason = chunked_loss_unsupported(model)
    if reason is not None:
        raise ValueError(f"chunked loss is not available: {reason}; use the model's own loss (loss_chunk_size=None)")
    extra = {} if position_ids is None else {"position_ids": position_ids}  # unpacked: what the model always got
    outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    hidden = last_hidden_state(outputs)
    head = model.get_output_embeddings()
    return chunked_cross_entropy(hidden, head.weight, labels, chunk_size, bias=head.bias)


__all__ = [
    "ChunkedCrossEntropy",
    "IGNORE_INDEX",
    "at_least_fp32",
    "softmax_dtype",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "check_chunk_size",
    "chunked_loss_unsupported",
    "exp_shifted_",
    "head_chunks",
    "head_compute_dtype",
    "last_hidden_state",
    "valid_rows",
]
