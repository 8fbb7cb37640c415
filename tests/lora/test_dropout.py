"""LoRA dropout: positions drawn as geometric gaps, the keep mask packed to bits and applied with an integer AND."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.lora.dropout import (
    apply_keep,
    dropout,
    dropped_positions,
    keep_mask_for,
    pack_mask,
    packed_dropout,
    unpack_mask,
)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (64, 128)])
def test_mask_packing_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    assert pack_mask(torch.tensor([True, False, True] + [False] * 5)).item() == 0b101  # element i is bit i


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_cpu_dropout_positions_are_independent_bernoulli_draws(p):
    """Geometric gaps give iid Bernoulli(p) drops: the rate, the pair rate of neighbours and no duplicates."""
    n = 1_000_000
    torch.manual_seed(0)
    positions = dropped_positions(n, p)
    assert positions.dtype == torch.int64 and bool((positions[1:] > positions[:-1]).all())  # sorted, distinct
    assert 0 <= int(positions[0]) and int(positions[-1]) < n
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(dropped.float().mean()) - p) < 5 * sigma
    both = float((dropped[1:] & dropped[:-1]).float().mean())  # neighbours independent: p² (a gap of 1 is p)
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    runs_of_8 = dropped[: n // 8 * 8].view(-1, 8).sum(1).bincount(minlength=9).double() / (n // 8)
    expected = torch.distributions.Binomial(8, torch.tensor(p)).log_prob(torch.arange(9.0)).exp().double()
    assert (runs_of_8 - expected).abs().max() < 0.005
    assert dropped_positions(0, p).numel() == 0 and dropped_positions(10, 0.0).numel() == 0


def test_cpu_dropout_keeps_the_mask_it_reports_and_scales_the_rest():
    x = torch.randn(64, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    dropped, keep, scale = dropout(x, 0.25)
    assert dropped.dtype == x.dtype and dropped.shape == x.shape and keep.shape == x.shape
    assert torch.equal(dropped, torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype)))
    assert 0.2 < 1 - float(keep.float().mean()) < 0.3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_backward_mask_zeroes_exactly_what_where_zeroes(dtype):
    """The integer AND of the backward mask gives torch.where's bits: +0.0 where dropped, the value where kept."""

    keep = torch.rand(37, 29, generator=torch.Generator().manual_seed(2)) >= 0.3  # 1073 elements: a partial byte
    t = torch.randn(37, 29, generator=torch.Generator().manual_seed(3)).to(dtype)
    t[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    mask = keep_mask_for(pack_mask(keep), keep.shape, dtype)
    assert mask.dtype == (torch.bool if dtype == torch.float64 else mask.dtype) and mask.shape == keep.shape
    expected = torch.where(keep, t, torch.zeros((), dtype=dtype))
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    for got in (apply_keep(t, mask), apply_keep(t.clone(), mask, inplace=True)):
        assert torch.equal(got.view(bits), expected.view(bits))


@pytest.mark.parametrize("shape", [(5, 7), (64, 128), (3,)])
def test_packed_dropout_drops_what_dropout_drops_and_packs_its_keep_mask(shape):
    """The fused path's mask, set bit by bit from the dropped positions, is pack_mask of the plain path's draw."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    torch.manual_seed(11)
    dropped, keep, scale = dropout(x, 0.3)
    torch.manual_seed(11)
    packed_dropped, bits, packed_scale = packed_dropout(x, 0.3)
    assert torch.equal(packed_dropped, dropped) and packed_scale == scale
    assert bits.dtype == torch.uint8 and torch.equal(bits, pack_mask(keep))  # padding bits 0 too
