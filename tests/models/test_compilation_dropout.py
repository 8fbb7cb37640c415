"""Compiled blocks replay the eager dropout masks in every checkpoint mode, and checkpointing still saves memory.

Apart from test_compilation.py so that, under ``pytest -n 2 --dist loadscope``, this minute of Inductor compiles
(three checkpoint modes) runs on one worker while the rest of the compile tests run on the other.
"""

from __future__ import annotations

import torch
from test_compilation import _fresh_dynamo, adapted_llama, ids, loss_and_grads  # noqa: F401 (the autouse fixture)
from torch._dynamo.utils import counters


def saved_activation_bytes(model, tokens) -> int:
    """Bytes autograd keeps for backward, not counting tensors that are parameters (already resident)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(input_ids=tokens).last_hidden_state
    hidden.sum().backward()
    return sum(saved.values())


def test_compiled_dropout_is_the_same_in_every_checkpoint_mode_and_checkpointing_still_saves_memory():
    tokens = ids(seq=64)
    runs = {}
    for mode in (None, "full", "selective"):
        model = adapted_llama(0.1, mode, compiled=True)
        runs[mode] = loss_and_grads(model, tokens)
        runs[mode] += (saved_activation_bytes(model, tokens),)
    eager_full = saved_activation_bytes(adapted_llama(0.1, "full", compiled=False), tokens)
    loss, grads, _ = runs[None]
    for mode in ("full", "selective"):  # the same dropout masks whether the block is recomputed or not
        torch.testing.assert_close(runs[mode][0], loss, rtol=1e-6, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(runs[mode][1][name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert counters["graph_break"] == {}, dict(counters["graph_break"])
    # checkpointing keeps only block inputs, compiled too: Inductor adds the rotary tables and the RNG seeds it
    # replays the masks from (8 KiB here), never the masks or the block's activations
    assert runs["full"][2] <= 1.1 * eager_full and eager_full < runs[None][2] / 4
