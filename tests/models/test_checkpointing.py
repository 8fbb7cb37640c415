"""Full and selective activation checkpointing: same gradients, attention recomputed or not, every n layers."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_qlora.lora.layer import LoRAConfig, inject_lora, mark_only_lora_trainable
from lightning_qlora.models.checkpointing import ATTENTION_OPS, checkpoint_kwargs, enable_gradient_checkpointing
from lightning_qlora.quantization.shells import quantize_model


class CountOps(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.count = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


def grads_and_attention_calls(mode, every_n_layers=1):
    torch.manual_seed(0)
    model = build_tiny_llama(num_hidden_layers=4, attn_implementation="sdpa")
    quantize_model(model)
    inject_lora(model, LoRAConfig(r=8, dropout=0.0))
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)  # nonzero B so every adapter gets a gradient
    if mode is not None:
        assert enable_gradient_checkpointing(model, mode, every_n_layers) == "transformers"
    model.train()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    counter = CountOps(ATTENTION_OPS)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counter.count


def test_selective_keeps_attention_and_gives_the_same_gradients():
    plain, calls_plain = grads_and_attention_calls(None)
    full, calls_full = grads_and_attention_calls("full")
    selective, calls_selective = grads_and_attention_calls("selective")
    assert calls_plain == 4 and calls_full == 8 and calls_selective == 4  # 4 layers: recomputed or kept
    assert plain.keys() == full.keys() == selective.keys() and len(plain) == 4 * 7 * 2
    for name in plain:
        assert torch.equal(full[name], selective[name]), name
        torch.testing.assert_close(full[name], plain[name], rtol=0, atol=1e-6)


def test_every_n_layers_checkpoints_only_some_blocks():
    _, calls = grads_and_attention_calls("full", every_n_layers=2)
    assert calls == 6  # 4 forward + 2 recomputed

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    net = Net()
    assert enable_gradient_checkpointing(net, "selective", every_n_layers=2) == "blocks"
    assert [getattr(b.forward, "_checkpointed", False) for b in net.blocks] == [True, False, True, False]


@pytest.mark.parametrize("bad", [{"mode": "partial"}, {"every_n_layers": 0}])
def test_bad_checkpointing_options_are_one_line_errors(bad):
    with pytest.raises(ValueError) as err:
        enable_gradient_checkpointing(build_tiny_llama(), **bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'partial'"):
        checkpoint_kwargs("partial")
