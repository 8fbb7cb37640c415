"""Activation bytes of preference tuning (DPO, IPO, ORPO) for the planner: sequence scores and the reference pass.

A preference step scores ``2B`` sequences (``B`` chosen, ``B`` rejected; the planner's ``batch_size`` counts
sequences). The policy's scores (:func:`lightning_qlora.models.sequence_logps.sequence_logps`) keep nothing
vocabulary-sized between forward and backward: each pass holds one chunk's fp32 logits (their softmax and gradient
formed in place) and their compute-dtype copy, ``6·vocab`` bytes per chunk token, and backward also forms the hidden
states' gradient. With the model's own logits (``loss_chunk_size=None``) the fp32 logits of the whole batch are kept
for backward: ``10·vocab`` per token in forward, ``16·vocab`` in backward (measured:
tests/memory/test_preference_memory.py).

DPO and IPO first run a no-grad forward of the same model with its adapters off (the reference): it holds the residual
stream and one decoder layer's working set at a time, then one chunk's logits, and frees all of it before the policy's
forward (:func:`reference_pass_bytes`). No weights are added: the reference is the 4-bit base already in memory.
"""

from __future__ import annotations

PREFERENCE_METHODS = ("dpo", "ipo", "orpo")
REFERENCE_METHODS = ("dpo", "ipo")
"""The methods that run a reference forward each step (ORPO has no reference)."""


def preference_loss_bytes(
    vocab: int, hidden: int, tokens: int, chunk: int | None, compute: int, act: int
) -> tuple[int, int]:
    """``(forward, backward)`` peak bytes of the sequence scores of ``tokens`` tokens.

    Args:
        vocab: vocabulary size.
        hidden: hidden size.
        tokens: tokens in the batch (all sequences).
        chunk: ``loss_chunk_size`` (``None``: the model's own logits).
        compute: bytes per element of the compute (autocast) dtype.
        act: bytes per element of the residual stream.
    """
    if chunk:
        n = min(tokens, chunk)
        one_chunk = 6 * vocab * n + compute * hidden * n
        return one_chunk, one_chunk + act * hidden * tokens
    return 10 * vocab * tokens, 16 * vocab * tokens


def reference_pass_bytes(
    method: str,
    tokens: int,
    dims: tuple[int, int, int, int],
    vocab: int,
    chunk: int | None,
    compute: int,
    act: int,
    dequantized: int,
) -> int:
    """Peak activation bytes of the reference forward (0 for ORPO).

    Per token, a decoder layer without autograd holds the residual stream and the normed input (``2·act·h``) plus
    the larger of attention's working set (an fp32 norm copy, q, k, v and the attention output:
    ``4h + compute·(2q + 2kv)``) and the MLP's (gate, up and their activation: ``3·compute·inter``); the scores then
    hold the final hidden states and one chunk's logits (``6·vocab`` per chunk token).

    Args:
        method: ``dpo``, ``ipo`` or ``orpo``.
        tokens: tokens in the batch (all sequences).
        dims: ``(hidden, q_dim, kv_dim, intermediate)`` sizes of a decoder layer.
        vocab: vocabulary size.
        chunk: ``loss_chunk_size`` (``None``: the model's own logits, all tokens at once).
        compute: bytes per element of the compute (autocast) dtype.
        act: bytes per element of the residual stream.
        dequantized: bytes of the largest weight dequantized for its matmul.

    Raises:
        ValueError: for an unknown method.
    """
    if method not in PREFERENCE_METHODS:
        raise ValueError(
            f"preference={method!r} is not a preference method; use one of {', '.join(PREFERENCE_METHODS)}"
        )
    if method not in REFERENCE_METHODS:
        return 0
    h, q_dim, kv_dim, inter = dims
    layer = tokens * (2 * act * h + max(4 * h + compute * (2 * q_dim + 2 * kv_dim), 3 * compute * inter))
    n = min(tokens, chunk) if chunk else tokens
    scores = act * h * tokens + 6 * vocab * n + (compute * h * n if chunk else 0)
    return max(layer + dequantized, scores)
