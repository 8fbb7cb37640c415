"""Chunked cross-entropy vs F.cross_entropy on full logits (loss and grads), memory, and the transformers bridge."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_qlora.models.losses import (
    causal_lm_loss,
    chunked_cross_entropy,
    chunked_loss_unsupported,
    exp_shifted_,
)

B, T, H, V = 2, 40, 64, 320


def inputs(seed: int = 0, hidden_dtype=torch.float32, head_trains: bool = True, bias: bool = False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(hidden_dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) * 0.2).requires_grad_(head_trains)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :7] = -100  # a masked prompt
    labels[1, -5:] = -100  # padding
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_(True) if bias else None
    return hidden, weight, labels, b


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])


def reference(hidden, weight, labels, bias=None, autocast=False):
    """transformers' causal-LM loss: head on every position (autocast dtype), fp32 logits, shifted labels."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = F.linear(hidden, weight, bias)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, -2), shifted.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("chunk", [1000, 16, 7], ids=["one-chunk", "chunks-of-16", "uneven-chunks"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fp32_loss_and_grads_match_full_logits(chunk, bias):
    hidden, weight, labels, b = inputs(bias=bias)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk, bias=b)
    expected = reference(hidden, weight, labels, b)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_of(loss, hidden, weight, b), grads_of(expected, hidden, weight, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32-hidden", "bf16-hidden"])
def test_bf16_autocast_matches_full_logits_within_bf16_tolerance(hidden_dtype):
    hidden, weight, labels, _ = inputs(seed=1, hidden_dtype=hidden_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=16)
    expected = reference(hidden, weight, labels, autocast=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)  # same bf16 matmul, fp32 softmax
    got_h, got_w = grads_of(loss, hidden, weight)
    want_h, want_w = grads_of(expected, hidden, weight)
    assert got_h.dtype == hidden_dtype and got_w.dtype == torch.float32
    for got, want in ((got_h, want_h), (got_w, want_w)):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 2**-7


def test_fp64_head_keeps_fp64_logits():
    """An fp64 model's loss and gradients are computed in fp64 throughout, not through fp32 logits."""
    hidden, weight, labels, b = inputs(seed=2, bias=True)
    hidden, weight, b = (t.detach().double().requires_grad_(True) for t in (hidden, weight, b))
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=16, bias=b)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    expected = F.cross_entropy(F.linear(hidden, weight, b).flatten(0, -2), shifted.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_of(loss, hidden, weight, b), grads_of(expected, hidden, weight, b)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_exp_shifted_gives_logsumexp_and_softmax_without_overflow():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1e4, 1e4 - 1.0, -1e4], [-50.0, -50.0, -50.0]], dtype=torch.float64)
    lse, sums = exp_shifted_(work := logits.clone())
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-15, atol=1e-12)
    torch.testing.assert_close(work / sums, torch.softmax(logits, -1), rtol=1e-15, atol=1e-15)
    assert bool(torch.isfinite(work).all()) and sums.shape == (3, 1)


def test_backward_scales_by_the_upstream_gradient_and_a_frozen_head_gets_none():
    hidden, weight, labels, _ = inputs(seed=2, head_trains=False)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    (3.0 * loss).backward()
    (want,) = grads_of(3.0 * reference(hidden, weight, labels), hidden)
    torch.testing.assert_close(hidden.grad, want, rtol=1e-5, atol=1e-7)
    assert weight.grad is None


def test_no_grad_and_all_ignored_batches():
    hidden, weight, labels, _ = inputs(seed=3)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(hidden, weight, labels).detach())
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(chunked_cross_entropy(hidden, weight, ignored)) and torch.isnan(
        reference(hidden, weight, ignored)
    )


def test_unshifted_flat_rows():
    hidden, weight, labels, _ = inputs(seed=4)
    flat_h, flat_y = hidden.detach().reshape(-1, H), labels.reshape(-1)
    loss = chunked_cross_entropy(flat_h, weight, flat_y, chunk_size=9, shift=False)
    torch.testing.assert_close(loss, F.cross_entropy(flat_h @ weight.T, flat_y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, -4, 2.5])
def test_bad_chunk_size_is_a_one_line_error(chunk):
    hidden, weight, labels, _ = inputs()
    with pytest.raises(ValueError, match=rf"chunk_size={chunk}.*positive integer") as err:
        chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    assert "\n" not in str(err.value)


def test_mismatched_shapes_are_a_one_line_error():
    hidden, weight, labels, _ = inputs()
    with pytest.raises(ValueError, match=r"got hidden \(2, 40, 64\), weight \(320, 64\) and labels \(2, 39\)"):
        chunked_cross_entropy(hidden, weight, labels[:, 1:])


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages ops under the mode allocate that are alive at once (checked after every op)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:  # new memory, not a view
                storage = t.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_peak_memory_stays_at_one_chunk_of_logits():
    batch, seq, vocab, width, chunk = 4, 128, 4096, 64, 64
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, width, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.bfloat16) * 0.1
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)

    def peak(fn) -> int:
        counter = PeakMemory()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            fn().backward()
        return counter.peak

    full = peak(lambda: reference(hidden, weight, labels))
    full_grad = hidden.grad.clone()
    hidden.grad = None
    chunked = peak(lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk))
    torch.testing.assert_close(hidden.grad, full_grad, rtol=2e-2, atol=1e-4)
    tokens = batch * seq
    assert full >= tokens * vocab * (2 + 4)  # bf16 logits and their fp32 copy at least
    assert chunked <= chunk * vocab * (2 + 4) + 4 * tokens * width * 2  # one chunk (bf16 + fp32) + O(tokens·H)
    assert chunked * 8 < full


# ----------------------------------------------------------------------------------- transformers models
def test_causal_lm_loss_matches_the_models_own_loss():
    model = build_tiny_llama()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels[1, -4:] = -100
    assert chunked_loss_unsupported(model) is None
    params = [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight]
    for autocast, tol in ((False, 1e-5), (True, 2**-7)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = causal_lm_loss(model, ids, labels, mask, chunk_size=16)
            theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
        for got, want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
            assert float((got - want).norm() / want.norm()) < tol


@pytest.mark.parametrize(
    "setting, reason",
    [
        ({"final_logit_softcapping": 30.0}, r"post-processes its logits \(config.final_logit_softcapping=30.0\)"),
        ({"logit_scale": 0.0625}, r"config.logit_scale=0.0625"),
        ({"logits_scaling": 8.0}, r"config.logits_scaling=8.0"),
        ({"output_router_logits": True}, "router auxiliary loss"),
    ],
)
def test_models_that_post_process_logits_are_reported(setting, reason):
    model = build_tiny_llama()
    for key, value in setting.items():
        setattr(model.config, key, value)
    assert re.search(reason, chunked_loss_unsupported(model) or "")
    with pytest.raises(ValueError, match="chunked loss is not available.*loss_chunk_size=None"):
        causal_lm_loss(model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_models_without_a_plain_head_or_decoder_are_reported():
    model = build_tiny_llama()
    assert chunked_loss_unsupported(model.model) is not None  # a bare decoder has no head
    lm = build_tiny_llama()
    lm.lm_head = torch.nn.Sequential(torch.nn.Linear(64, 512))
    assert "output head is Sequential" in chunked_loss_unsupported(lm)
