"""The LoRA callback in Trainer.fit: frozen base bit-identical, gradient checkpointing, adapter-only checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRA, NF4Precision
from lightning_qlora.callbacks.lora import CHECKPOINT_KEY
from lightning_qlora.lora.layer import lora_modules
from lightning_qlora.models.checkpointing import enable_gradient_checkpointing


def token_loader(n=8, length=16, batch_size=4, seed=0):
    ids = torch.randint(4, 512, (n, length), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids), batch_size=batch_size)


class LM(L.LightningModule):
    def __init__(self, model: nn.Module | None = None, seed: int = 0, **config):
        super().__init__()
        self.model = model if model is not None else build_tiny_llama(seed=seed, **config)
        self.training_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        self.training_modes.append(self.model.training)
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def make_trainer(tmp_path=None, plugins=None, callbacks=(), steps=3, **kwargs):
    return L.Trainer(
        plugins=[NF4Precision()] if plugins is None else plugins,
        callbacks=list(callbacks),
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@torch.no_grad()
def logits(module: LM, ids: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return module.model(ids).logits


class Snapshot(L.Callback):
    """The full state dict (packed 4-bit bytes and quantization state included) when training starts."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


# ------------------------------------------------------------------------------------------- frozen base unchanged
def test_every_non_adapter_tensor_is_bit_identical_after_fit():
    snapshot = Snapshot()
    module = LM()
    make_trainer(callbacks=[LoRA(r=4, dropout=0.1), snapshot], steps=4).fit(module, token_loader())
    after = module.state_dict()
    assert after.keys() == snapshot.state.keys()
    base_keys = [k for k in after if "lora_" not in k]
    quant_keys = [k for k in base_keys if ".weight." in k]  # absmax, quant_map, nested_*, quant_state.bitsandbytes__nf4
    assert len(quant_keys) >= 14 * 5 and any(k.endswith("bitsandbytes__nf4") for k in quant_keys)
    for key in base_keys:
        assert after[key].dtype == snapshot.state[key].dtype and torch.equal(after[key], snapshot.state[key]), key
    assert any(not torch.equal(after[k], snapshot.state[k]) for k in after if "lora_B" in k)


# ------------------------------------------------------------------------------------------ gradient checkpointing
def count_forward_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_really_recomputes_an_hf_model_from_pretrained(tiny_llama_dir, checkpointing):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    assert not model.training  # from_pretrained returns eval mode, which would silently turn checkpointing off
    module = LM(model)
    calls = count_forward_calls(model.model.layers[0].mlp)
    steps = 2
    make_trainer(callbacks=[LoRA(r=4, dropout=0.0, gradient_checkpointing=checkpointing)], steps=steps).fit(
        module, token_loader()
    )
    assert module.training_modes == [True] * steps
    assert all(layer.gradient_checkpointing == checkpointing for layer in model.model.layers)
    assert len(calls) == (2 if checkpointing else 1) * steps  # forward, and again in backward when checkpointing


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.output = nn.Linear(64, 64)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.output(x)


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = Net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_blocks_of_a_plain_module_list(checkpointing):
    module = Regression()
    calls = count_forward_calls(module.model.blocks[1].act)  # (linears get replaced)
    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)), batch_size=4)
    make_trainer(callbacks=[LoRA(r=4, dropout=0.0, gradient_checkpointing=checkpointing)], steps=2).fit(module, data)
    assert len(calls) == (4 if checkpointing else 2)
    assert all(getattr(b.forward, "_checkpointed", False) == checkpointing for b in module.model.blocks)


def test_gradient_checkpointing_needs_blocks():
    assert enable_gradient_checkpointing(Net()) == "blocks"
    with pytest.raises(ValueError, match="Sequential has no ModuleList of blocks"):
        enable_gradient_checkpointing(nn.Sequential(nn.Linear(64, 64)))


# ------------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 3 steps and its checkpoint."""
    tmp_path = tmp_path_factory.mktemp("ckpt")
    module = LM()
    trainer = make_trainer(tmp_path, callbacks=[LoRA(r=4, alpha=8, dropout=0.0)], steps=3)
    trainer.fit(module, token_loader())
    path = tmp_path / "adapters.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_checkpoint_holds_only_adapters_and_optimizer_state(trained):
    module, path = trained
    checkpoint = torch.load(path, weights_only=False)
    adapters = {n: p for n, p in module.named_parameters() if "lora_" in n}
    assert set(checkpoint["state_dict"]) == set(adapters)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.values())
    state = checkpoint["optimizer_states"][0]["state"]
    optimizer_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if t.dim() > 0)
    assert optimizer_bytes == 2 * adapter_bytes  # AdamW: exp_avg and exp_avg_sq for the adapters only
    base_bytes = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "lora_" not in n) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )
    n_tensors = len(checkpoint["state_dict"]) + sum(len(s) for s in state.values())
    size = path.stat().st_size
    bound = adapter_bytes + optimizer_bytes + 512 * n_tensors + 16 * 1024  # + zip records, pickle and metadata
    assert adapter_bytes + optimizer_bytes < size <= bound
    assert size < base_bytes  # the frozen base (embeddings, head, 4-bit layers) is not in it
    meta = checkpoint[CHECKPOINT_KEY]
    assert meta["lora"]["r"] == 4 and meta["base"]["quantization"]["quant_type"] == "nf4"


def test_checkpoint_restores_exactly_onto_a_freshly_quantized_base(trained):
    module, path = trained
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    expected = logits(module, ids)

    fresh = LM()
    make_trainer(callbacks=[LoRA(r=4, alpha=8, dropout=0.0)], steps=3).fit(fresh, token_loader(), ckpt_path=path)
    restored = logits(fresh, ids)
    assert torch.equal(restored, expected)
    trained_adapters = {n: p for n, p in module.named_parameters() if "lora_" in n}
    for name, param in fresh.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, trained_adapters[name])
    assert sum(1 for _ in lora_modules(fresh)) == 14


def _refusal(path, module, plugins=None, lora=None) -> str:
    trainer = make_trainer(plugins=plugins, callbacks=[lora or LoRA(r=4, alpha=8, dropout=0.0)], steps=3)
    with pytest.raises(ValueError) as err:
        trainer.fit(module, token_loader(), ckpt_path=path)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith("checkpoint "), message
    return message


def test_checkpoint_from_a_base_with_other_weights_is_refused(trained):
    _, path = trained
    message = _refusal(path, LM(seed=1))
    assert "different weights" in message or "other weights" in message
    assert "model.embed_tokens.weight" in message and "same base model" in message


def test_checkpoint_from_a_base_with_other_linear_weights_only_is_refused(trained):
    """A base merged with another adapter keeps embeddings and norms: its 4-bit codes tell it apart."""
    _, path = trained
    merged = LM()
    with torch.no_grad():
        for layer in merged.model.model.layers:
            layer.self_attn.q_proj.weight.add_(0.05 * torch.randn_like(layer.self_attn.q_proj.weight))
    started = []

    class Started(L.Callback):
        def on_train_batch_start(self, *args):
            started.append(True)

    trainer = make_trainer(callbacks=[LoRA(r=4, alpha=8, dropout=0.0), Started()], steps=6)
    with pytest.raises(ValueError) as err:
        trainer.fit(merged, token_loader(), ckpt_path=path)
    message = str(err.value)
    assert "\n" not in message and "other 4-bit weights" in message and "q_proj.weight" in message
    assert not started  # refused before any step


def test_checkpoint_from_another_architecture_is_refused_before_loading(trained):
    _, path = trained
    message = _refusal(path, LM(intermediate_size=192))  # torch would fail with a multi-line size mismatch
    assert "different architecture" in message and "(64, 128) there and (64, 192) here" in message


@pytest.mark.parametrize("plugins", [[NF4Precision(double_quant=False)], []], ids=["no-double-quant", "no-4bit"])
def test_checkpoint_with_other_quantization_is_refused(trained, plugins):
    _, path = trained
    message = _refusal(path, LM(), plugins=plugins)
    assert "quantization {'quant_type': 'nf4', 'double_quant': True" in message
    assert ("'double_quant': False" in message) if plugins else ("none (full precision)" in message)


def test_checkpoint_with_other_lora_rank_is_refused(trained):
    _, path = trained
    message = _refusal(path, LM(), lora=LoRA(r=8, alpha=8, dropout=0.0))
    assert "r=4" in message and "r=8" in message


# ------------------------------------------------------------------------------------------------------- bad input
class Embedder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.norm = nn.LayerNorm(64)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.norm(self.embed(ids)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("plugins", [[NF4Precision()], []], ids=["nf4", "full-precision"])
def test_fit_on_a_model_without_linear_layers_is_a_one_line_error(plugins):
    with pytest.raises(ValueError) as err:
        make_trainer(plugins=plugins, callbacks=[LoRA(r=4)], steps=1).fit(Embedder(), token_loader())
    message = str(err.value)
    assert "\n" not in message and "Embedder has no linear layer" in message and "nn.Linear" in message


def test_fit_with_a_target_that_matches_nothing_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        make_trainer(callbacks=[LoRA(r=4, target_modules=["qkv"])], steps=1).fit(LM(), token_loader())
    message = str(err.value)
    assert "\n" not in message and "target_modules=['qkv']" in message and "available: " in message
