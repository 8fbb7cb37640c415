"""LiveTensorTracker: peak bytes of live tensor storages created inside a block, views and old tensors excluded."""

import torch

from lightning_qlora.memory.tracker import LiveTensorTracker, tensor_bytes


def test_counts_new_storages_once_and_frees_them():
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000, 1000)  # 4 MB
        view = a.view(-1)  # same storage: nothing new
        b = torch.ones(500, 1000)  # 2 MB
        assert tracker.current == 6_000_000
        del b
        c = a + 1  # 4 MB
        assert tracker.current == 8_000_000 and tracker.peak == 8_000_000
        del a, view
        assert tracker.current == 4_000_000  # a's storage is gone once its view is gone too
        tracker.reset_peak()
        assert tracker.peak == 4_000_000
    assert c.numel() == 1_000_000


def test_old_tensors_views_and_in_place_ops_cost_nothing():
    weight = torch.randn(256, 256)
    with LiveTensorTracker() as tracker:
        weight.t()
        weight.detach()
        weight.mul_(1.0)
        assert tracker.peak == 0
        out = weight @ weight  # a new 256x256 fp32 result
    assert tracker.peak == out.numel() * 4


def test_backward_gradients_are_counted():
    x = torch.randn(100, 100, requires_grad=True)
    with LiveTensorTracker() as tracker:
        y = (x.exp() * 2).sum()
        y.backward()
    # x.grad (40 kB) stays; at the peak exp's output (saved) and the gradient temporaries were alive too
    assert tracker.current >= x.grad.numel() * 4
    assert tracker.peak >= 3 * 40_000


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 10)
    assert tensor_bytes([a, a.view(-1), a[0]]) == 400
    assert tensor_bytes([a, torch.zeros(5, dtype=torch.bfloat16)]) == 410
