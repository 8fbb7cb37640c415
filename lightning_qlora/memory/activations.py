"""Activation bytes of one QLoRA training step, phase by phase, for the planner (:mod:`lightning_qlora.memory.planner`).

What autograd keeps for a Llama-style decoder layer under bf16 autocast with SDPA attention (no ``seq²`` term) and
the fused LoRA function, per token: ``8h`` (two RMSNorms' fp32 copies) ``+ 4h`` (the two normed inputs)
``+ 2q+2kv+2kv+2q+4·heads`` (SDPA's q, k, v, output = o_proj's input, log-sum-exp) ``+ 4·2i`` (SiLU input/output, up,
their product) ``+ 2r`` and a 1-bit dropout mask per adapter input. Gradient checkpointing keeps only each layer's
input (``2h``) plus one recomputed layer. The loss keeps ``12·vocab`` bytes per token at its peak with transformers'
loss (fp32 log-softmax output, its gradient and the logits' gradient); the chunked loss of
:mod:`lightning_qlora.models.losses` ``6·vocab`` per token of one chunk. Mixture-of-experts layers are counted by
:mod:`lightning_qlora.memory.moe`, preference tuning's sequence scores and reference pass by
:mod:`lightning_qlora.memory.preference`.

The step is followed through its phases (:data:`PHASES`): the end of the forward, the loss's backward, and the
backward of the top and of the bottom decoder layer (where the adapters' gradients have appeared), plus the reference
forward of DPO/IPO; the planner takes the largest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_qlora.lora.layer import LoRAConfig
from lightning_qlora.memory.moe import plan_moe_layers
from lightning_qlora.memory.preference import preference_loss_bytes, reference_pass_bytes

PHASES = ("forward end", "loss backward", "last layer backward", "first layer backward", "reference forward")
"""The moments of a step whose bytes :func:`activation_phases` counts, in order (the last one for DPO/IPO only)."""


def _input_group(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}  # fmt: skip
    return groups.get(last, name)


def activation_phases(
    net: nn.Module,
    text: Any,
    lora: LoRAConfig,
    shapes: Sequence[tuple[str, int, int]],
    *,
    batch_size: int,
    seq_len: int,
    act: int,
    compute: int,
    master: int,
    adapter_params: int,
    adapter_bytes: int,
    largest: int,
    loss_chunk_size: int | None,
    preference: str | None,
) -> dict[bool, list[tuple[int, int]]]:
    """``(activation bytes, adapter gradient bytes)`` at each phase of one step, with checkpointing on and off.

    A layer's gradients appear as its saved activations are freed, so each layer phase counts the gradients of the
    layers done before it only.

    Args:
        net: the model (usually on the meta device).
        text: its text config (``hidden_size``, ``vocab_size``, ``num_hidden_layers``, heads, ``intermediate_size``).
        lora: the adapter settings (rank, dropout, fused).
        shapes: ``(name, in_features, out_features)`` of every adapted linear layer.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        act: bytes per element of the residual stream (the unquantized parameters' dtype).
        compute: bytes per element of the compute (autocast) dtype.
        master: bytes per element of the adapters' master weights.
        adapter_params: number of adapter parameters (all layers, experts included).
        adapter_bytes: their bytes.
        largest: elements of the largest 4-bit weight dequantized at once (one expert of a stack).
        loss_chunk_size: tokens per chunk of the chunked loss; ``None``: transformers' loss.
        preference: ``dpo``, ``ipo`` or ``orpo`` for a preference step, else ``None``.

    Returns:
        ``{checkpointing: [(activations, gradients) for each phase of PHASES]}`` (the reference forward only for
        DPO/IPO).
    """
    e, c = act, compute
    h, vocab, layers = text.hidden_size, text.vocab_size, text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    q_dim, kv_dim = heads * head_dim, getattr(text, "num_key_value_heads", heads) * head_dim
    inter = getattr(text, "intermediate_size", 4 * h)
    fused = getattr(lora, "fused", True)
    layer0 = [(t, i, o) for t, i, o in shapes if ".layers.0." in f".{t}."] or shapes[: len(shapes) // max(layers, 1)]
    groups = {_input_group(t) for t, _, _ in layer0}
    lora_saved = 0
    for t, i, _ in layer0:  # what each adapter keeps: x·Aᵀ, plus its input unless another saver holds it already
        group = _input_group(t)
        x_bytes = c if group == "attn_out" else e
        lora_saved += c * lora.r + (c * i if x_bytes != c else 0)  # an autocast copy when x is not in bf16
        if fused and lora.dropout > 0:
            lora_saved += math.ceil(i / 8)  # the dropout mask, one bit per input element
        elif not fused:
            lora_saved += (1 + x_bytes) * i if lora.dropout > 0 else 0  # dropout mask and output
    shared_inputs = e * h * len(groups & {"attn_in", "mlp_in"}) + (e * inter if "mlp_mid" in groups else 0)
    # two RMSNorms (fp32 copy + rsqrt), SDPA's q, k, v, output (the o_proj input) and log-sum-exp, SiLU in/out, up
    sdpa = c * (2 * q_dim + 2 * kv_dim) + 4 * heads
    moe = plan_moe_layers(net, text, adapters=True, r=lora.r, act=e, compute=c, master=master)
    attn_layer = 2 * (4 * h + 4) + sdpa + shared_inputs + lora_saved
    dense_layers = layers - moe.layers
    per_dense, per_moe = attn_layer + 3 * e * inter, attn_layer + moe.per_token + 3 * e * moe.shared_inter
    per_layer = max(per_dense if dense_layers else 0, per_moe if moe.layers else 0)  # the layer a backward redoes
    all_layers = dense_layers * per_dense + moe.layers * per_moe
    first_norm = (4 * h + 4) * batch_size * seq_len  # layer 0's input needs no gradient: its norm keeps nothing
    cast_layer = adapter_params * c // max(layers, 1) if master != c and not fused else 0  # autocast copies of A, B
    cast_layer += moe.per_layer  # the experts' adapters, cast once per expert
    grads_layer = adapter_bytes // max(layers, 1)
    # backward of the widest layer: grad from W0, from the adapter, their sum (or SiLU·up's three gradients)
    widest = max((i for _, i, _ in layer0), default=inter)
    temps = (3 * c + (1 if fused and lora.dropout > 0 else 0)) * widest  # + the unpacked dropout mask
    dequantized = c * largest  # W0 of the widest layer, dequantized for its matmul (forward and backward)
    tokens = batch_size * seq_len
    head_saved = 4 * h * tokens  # the final norm's fp32 copy
    if loss_chunk_size:  # fp32 logits of one chunk and their bf16 gradient; grad_h formed in forward, scaled after
        chunk = min(tokens, loss_chunk_size)
        loss_fwd, loss_bwd = 6 * vocab * chunk + c * h * chunk + e * h * tokens, 2 * e * h * tokens
    else:  # transformers' loss: bf16 logits, their fp32 copy, log-softmax (kept), then its gradient and the logits'
        loss_fwd, loss_bwd = 10 * vocab * tokens, 12 * vocab * tokens
    reference = 0
    if preference is not None:  # the scores' logits are recomputed in backward; DPO/IPO add a no-grad forward
        loss_fwd, loss_bwd = preference_loss_bytes(vocab, h, tokens, loss_chunk_size, c, e)
        dims = (h, q_dim, kv_dim, inter)
        reference = reference_pass_bytes(preference, tokens, dims, vocab, loss_chunk_size, c, e, c * largest)
    ckpt = e * h * tokens  # one checkpointed layer input
    fixed = 16 * tokens + 2 * 2 * head_dim * tokens  # ids, labels, rotary cos/sin

    def phases(checkpointing: bool) -> list[tuple[int, int]]:
        saved = layers * ckpt if checkpointing else all_layers * tokens - first_norm
        casts = cast_layer * layers - moe.per_layer * dense_layers
        one = per_layer * tokens + cast_layer + temps * tokens
        return [
            (saved + head_saved + loss_fwd + casts + fixed, 0),
            (saved + head_saved + loss_bwd + (0 if checkpointing else casts) + fixed, 0),
            ((saved + one if checkpointing else saved + temps * tokens) + fixed + dequantized, 0),
            ((ckpt + one if checkpointing else one) + fixed + dequantized, adapter_bytes - grads_layer),
            *([(reference + fixed, 0)] if reference else []),  # before the policy's forward: nothing else alive
        ]

    return {True: phases(True), False: phases(False)}


__all__ = ["PHASES", "activation_phases"]
