"""The check that packed rows stay apart: a model whose attention mask ignores ``position_ids`` would mix them.

transformers builds the block-diagonal mask of packed rows from ``position_ids`` in most causal LMs (and
flash-attention's variable-length kernel reads the same positions), but not in all (ALiBi models such as Bloom and
MPT, OPT, BioGPT, ... build their masks from the attention mask alone). So the first packed batch is run through
the decoder twice without gradients as two rows per sequence, the second time with the first row changed: the
second row must come out the same.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_qlora.models.losses import last_hidden_state

__all__ = ["PackedAttentionError", "check_packed_rows_stay_apart"]

_RELATIVE_TOLERANCE = 1e-3
"""A leak moves the later row's hidden states by a sizeable fraction of their scale; kernels' noise stays far below."""


class PackedAttentionError(ValueError):
    """Packed rows attend to each other in this model: packing cannot be used with it."""


@torch.no_grad()
def check_packed_rows_stay_apart(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Run a batch as two packed rows per sequence twice, the first row changed the second time; the second must stay.

    The positions restart half-way along every sequence and the ids are a seeded draw (whatever the batch holds, so
    every process of a distributed run reaches the same verdict); dropout draws the same masks both times (the
    random state is forked and reseeded), so only attention across rows could move the second row's hidden states.

    Args:
        model: a transformers causal LM (its decoder, ``model.base_model``, is run when it has one).
        input_ids: ``(B, T)`` token ids of the first packed batch: the check draws its own ids of that shape (so
            compiled blocks keep their shapes; they still compile once more, for the no-grad mode).

    Raises:
        PackedAttentionError: if the second row moved.
    """
    length = input_ids.shape[1]
    if length < 2:
        return
    device, kind = input_ids.device, input_ids.device.type
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = int(getattr(embeddings, "num_embeddings", 0) or int(input_ids.max()) + 1)
    # the same ids on every process of a distributed run (a seeded draw of the batch's shape): the same verdict
    ids = torch.randint(0, vocab, input_ids.shape, generator=torch.Generator().manual_seed(0)).to(device)
    start = length // 2
    positions = torch.cat([torch.arange(start), torch.arange(length - start)]).to(device).expand_as(ids)
    changed = ids.clone()
    changed[:, :start] = (changed[:, :start] + 1) % vocab
    decoder = getattr(model, "base_model", model)
    backend = getattr(torch, kind, None) if kind != "cpu" else None
    count = backend.device_count() if hasattr(backend, "device_count") else 0  # every generator of that kind is kept
    # autocast would cache its low-precision copies of trainable leaves (LoRA A/B on the plain path) made here,
    # without autograd history, and the training forward after this would reuse them: no caching in the check
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    uncached = torch.autocast(kind, dtype=dtype, enabled=dtype is not None, cache_enabled=False)
    outputs = []
    for tokens in (ids, changed):
        rng = torch.random.fork_rng(devices=list(range(count)), device_type=kind if count else "cuda")
        with rng, uncached:
            torch.manual_seed(0)
            try:
                out = decoder(input_ids=tokens, position_ids=positions, use_cache=False)
            except TypeError as err:
                if "position_ids" not in str(err):
                    raise
                raise PackedAttentionError(
                    f"packing: {type(model).__name__} takes no position_ids, so packed rows cannot be kept apart; "
                    "set packing=False on the data module for this model"
                ) from None
        outputs.append(last_hidden_state(out)[:, start:].float())
    moved = (outputs[0] - outputs[1]).abs().max().item()
    scale = outputs[0].abs().max().item()
    if not moved <= _RELATIVE_TOLERANCE * max(scale, 1e-6):
        raise PackedAttentionError(
            f"packing: {type(model).__name__} lets packed rows attend to each other (its attention mask does not "
            f"follow position_ids; a row's hidden states moved by {moved:.3g} when the row before it changed); "
            "set packing=False on the data module for this model"
        )
