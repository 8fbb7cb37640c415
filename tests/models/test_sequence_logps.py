"""Chunked per-sequence log-probabilities against the model's own full logits, values and gradients in float64."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.models.preference import model_sequence_logps
from lightning_qlora.models.sequence_logps import sequence_logps


def test_sequence_logps_chunked_equal_full_logits_in_float64(tiny_llama):
    model = tiny_llama.double()
    ids = torch.randint(4, 512, (4, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, 15:] = -100
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    results = []
    for chunk in (7, None):
        model.zero_grad()
        logps, tokens = model_sequence_logps(model, ids, labels, mask, chunk)
        (logps * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)).sum().backward()
        grads = [model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()]
        results.append((logps, tokens, grads))
    (chunked, tokens, grads), (full, full_tokens, full_grads) = results
    torch.testing.assert_close(chunked.double(), full.double(), rtol=1e-6, atol=1e-6)
    assert tokens.tolist() == full_tokens.tolist() == [13, 8, 13, 13]
    for grad, reference in zip(grads, full_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-8)


def test_bad_chunk_size_and_shapes_are_one_line_errors():
    hidden, weight, labels = torch.zeros(2, 3, 8), torch.zeros(16, 8), torch.zeros(2, 3, dtype=torch.long)
    for kwargs, fragment in (({"chunk_size": 0}, "positive integer"), ({"labels": labels[:, :2]}, "expected hidden")):
        with pytest.raises(ValueError, match=fragment) as err:
            sequence_logps(**{"hidden": hidden, "weight": weight, "labels": labels, **kwargs})
        assert "\n" not in str(err.value)
