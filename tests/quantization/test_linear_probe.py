"""Linear layers a model uses other than by calling them stay full precision without an adapter; the rest do not."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, MambaConfig
from transformers.models.t5.modeling_t5 import T5DenseActDense

from lightning_qlora import CausalLM, LoRA
from lightning_qlora.lora.layer import LoRAConfig, LoRALinear, find_lora_targets
from lightning_qlora.quantization import linear_probe
from lightning_qlora.quantization.linear_probe import computes_linear_map, stands_in_as_linear, weights_read_by
from lightning_qlora.quantization.nf4 import QuantizationConfig, is_4bit_linear
from lightning_qlora.quantization.shells import quantize_model


class Mixer(nn.Module):
    """Reads ``dt.weight`` as a matrix (as Mamba does); the other reads are metadata, a type check or tying."""

    def __init__(self):
        super().__init__()
        self.inp, self.dt, self.out = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def tie_weights(self):
        self.out.weight = self.inp.weight

    def forward(self, x):
        x = self.inp(x.to(self.inp.weight.dtype))
        assert isinstance(self.out.weight, torch.Tensor) and self.out.weight.shape[0] == 64
        return self.out(x @ self.dt.weight.T)


class GroupedLinear(nn.Linear):
    """A subclass whose forward views its weight as one block per group (as DeepSeek-V4's ``o_a_proj``)."""

    groups = 2

    def forward(self, x):
        w = self.weight.view(self.groups, self.out_features // self.groups, -1)
        return torch.einsum("...gi,goi->...go", x.unflatten(-1, (self.groups, -1)), w).flatten(-2)


class ReimplementedLinear(nn.Linear):
    """Writes the linear map out itself (as Falcon's ``FalconLinear``): still a linear map."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class SlicedMLP(nn.Module):
    """Reads ``down.weight`` in slices only when its setting asks for it (as Bloom's ``slow_but_exact``)."""

    def __init__(self, exact: bool):
        super().__init__()
        self.exact, self.tp = exact, 2
        self.up, self.down, self.scale = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 128)

    def forward(self, x):
        h = self.up(x)
        if self.tp > 1 and self.exact:
            return sum(F.linear(part, w) for part, w in zip(h.chunk(2, -1), self.down.weight.chunk(2, -1)))
        if self.training:  # a flag that changes at run time: the read counts whatever it is now
            h = h * self.scale.weight.sum()
        return self.down(h)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(linear_probe, "_WARNED", set())


def test_only_tensor_reads_outside_initialisation_count():
    assert weights_read_by(Mixer) == frozenset({"dt"})
    # T5 checks ``isinstance(self.wo.weight, torch.Tensor)`` and casts to ``self.wo.weight.dtype``: metadata only
    assert weights_read_by(T5DenseActDense) == frozenset()


def test_reads_under_a_setting_count_only_where_the_setting_takes_that_branch():
    assert weights_read_by(SlicedMLP) == frozenset({"down", "scale"})  # the class: every read
    assert weights_read_by(SlicedMLP(exact=False).eval()) == frozenset({"scale"})
    assert weights_read_by(SlicedMLP(exact=True)) == frozenset({"down", "scale"})
    model = SlicedMLP(exact=False)
    with pytest.warns(UserWarning, match="SlicedMLP reads the weights of scale itself"):
        quantize_model(model, QuantizationConfig(compute_dtype=torch.float32))
    assert is_4bit_linear(model.up) and is_4bit_linear(model.down) and not is_4bit_linear(model.scale)


def test_subclass_forward_is_probed_once_on_real_and_meta_weights():
    assert computes_linear_map(ReimplementedLinear(64, 128))
    assert not computes_linear_map(GroupedLinear(128, 64))  # the grouped map is not x·Wᵀ over the whole weight
    with torch.device("meta"):
        meta = ReimplementedLinear(64, 128)
    assert computes_linear_map(meta)


def test_layers_read_directly_or_grouped_stay_full_precision_without_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(Mixer(), GroupedLinear(64, 64), ReimplementedLinear(64, 64))
    with pytest.warns(UserWarning) as record:
        quantize_model(model, QuantizationConfig(compute_dtype=torch.float32))
        targets = find_lora_targets(model, LoRAConfig(r=4))
    messages = [str(w.message) for w in record]
    assert sum("Mixer reads the weights of dt itself" in m for m in messages) == 1  # once, though both passes met it
    assert sum("GroupedLinear (1) does not compute" in m for m in messages) == 1
    assert type(model[0].dt) is nn.Linear and model[0].dt.weight.dtype == torch.float32
    assert isinstance(model[1], GroupedLinear) and model[1].weight.dtype == torch.float32
    assert all(is_4bit_linear(m) for m in (model[0].inp, model[0].out, model[2]))
    assert targets == ["0.inp", "0.out", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second model of the same classes: no new warning
        assert not stands_in_as_linear(model, "0.dt", model[0].dt)


def test_mamba_trains_in_4_bits_with_dt_proj_in_full_precision(tmp_path):
    config = MambaConfig(vocab_size=512, hidden_size=64, state_size=16, num_hidden_layers=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba")
    module = CausalLM(model=str(tmp_path / "mamba"), dtype="fp32", lr=1e-2)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = quiet_trainer(tmp_path, [LoRA(r=8, dropout=0.0), Record()], max_steps=3)
    with pytest.warns(UserWarning, match="MambaMixer reads the weights of dt_proj, out_proj, x_proj itself"):
        trainer.fit(module, torch.utils.data.DataLoader([{"input_ids": ids, "labels": ids}] * 3, batch_size=None))
    mixer = module.model.backbone.layers[0].mixer
    assert type(mixer.dt_proj) is nn.Linear and mixer.dt_proj.weight.dtype == torch.float32
    assert not mixer.dt_proj.weight.requires_grad
    assert isinstance(mixer.in_proj, LoRALinear) and is_4bit_linear(mixer.in_proj.base_layer)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
