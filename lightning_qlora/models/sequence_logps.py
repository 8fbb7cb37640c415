"""Per-sequence log-probabilities of the labelled tokens, in chunks of tokens: the scores of preference objectives.

``logps[b] = Σ_t log softmax(h[b,t]·Wᵀ + bias)[labels[b,t+1]]`` over the positions whose shifted label is not
``-100``. As :func:`lightning_qlora.models.losses.chunked_cross_entropy`, the head runs over at most ``chunk_size``
labelled tokens at a time and ignored tokens never reach it; unlike it, the gradient depends on the objective built on
the sums, so backward recomputes each chunk's logits and forms ``∂logp/∂logits = onehot - softmax`` in place, instead
of forming it in forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_qlora.models.losses import (
    IGNORE_INDEX,
    check_chunk_size,
    exp_shifted_,
    head_chunks,
    head_compute_dtype,
    softmax_dtype,
    valid_rows,
)

__all__ = ["ChunkedTokenLogps", "sequence_logps"]


class ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(hidden·weightᵀ + bias)[target]`` per row of ``hidden``, one chunk of rows at a time.

    Rows whose target is ``-100`` get 0. Backward recomputes each chunk's logits and turns them in place into
    ``∂logp/∂logits = onehot - softmax`` scaled by the upstream gradient, so no vocabulary-sized tensor is kept
    between forward and backward and at most one chunk's exists at any time.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``(N,)`` log-probabilities of ``targets`` (``(N,)``) under the rows of ``hidden`` (``(N, H)``).

        fp32, or fp64 for an fp64 head.
        """
        out = torch.zeros(hidden.shape[0], dtype=softmax_dtype(compute_dtype), device=hidden.device)
        w, b = _cast(weight, bias, compute_dtype)
        valid = valid_rows(targets)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows, _, logits, y in head_chunks(hidden, w, b, targets, valid, chunk_size, compute_dtype):
                out.index_copy_(0, rows, logits.gather(1, y.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, -1))
                del logits  # before the next chunk's logits exist
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Recompute each chunk's logits; ``grad_logits = g·(onehot - softmax)``, then ``grad_h``, ``grad_W``."""
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        wide = softmax_dtype(ctx.compute_dtype)
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=wide, device=weight.device) if need_b else None
        w, b = _cast(weight, bias, ctx.compute_dtype)
        valid = valid_rows(targets)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows, h, logits, y in head_chunks(hidden, w, b, targets, valid, ctx.chunk_size, ctx.compute_dtype):
                g_out = grad_out.index_select(0, rows).to(logits.dtype).unsqueeze(1)
                _, sums = exp_shifted_(logits)
                g = logits.mul_(sums.reciprocal_().mul_(g_out).neg_())  # -g·softmax, in place
                del logits
                g.scatter_add_(1, y.unsqueeze(1), g_out)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(ctx.compute_dtype)  # the fp32 chunk is freed here
                if need_h:
                    grad_h.index_copy_(0, rows, (g @ w).to(hidden.dtype))
                if need_w:
                    grad_w += g.t() @ h
                del g, h
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _cast(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in the matmul's dtype, cast once per pass."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of next-token log-probabilities over the labelled tokens, in chunks of tokens.

    ``logps[b] = Σ_t log softmax(h[b,t]·Wᵀ + bias)[labels[b,t+1]]`` over the ``t`` whose shifted label is not
    ``-100`` (the sequence scores of preference objectives), through :class:`ChunkedTokenLogps`: the head matmul in
    the autocast dtype when autocast is on (else in ``hidden``'s dtype), the softmax in fp32, at most
    ``chunk_size × V`` logits at a time, recomputed in backward.

    Args:
        hidden: final hidden states ``(B, T, H)``.
        weight: output head weight ``(V, H)``.
        labels: token ids ``(B, T)``, ``-100`` where no log-probability is taken; shifted inside as transformers does.
        chunk_size: tokens per chunk.
        bias: output head bias ``(V,)``, if any.

    Returns:
        ``(logps, tokens)``: fp32 sums ``(B,)`` and the number of labelled tokens per sequence ``(B,)``.

    Raises:
        ValueError: on a non-positive ``chunk_size`` or shapes that do not fit together.
    """
    check_chunk_size(chunk_size)
    if hidden.dim() != 3 or hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"sequence_logps got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
            f"{tuple(labels.shape)}; expected hidden (B, T, H), weight (V, H) and labels (B, T)"
        )
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).to(hidden.device)
    compute = head_compute_dtype(hidden)
    flat = hidden.reshape(-1, hidden.shape[-1])
    per_token = ChunkedTokenLogps.apply(flat, weight, bias, targets, chunk_size, compute)
    return per_token.view(labels.shape).sum(dim=1), (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
