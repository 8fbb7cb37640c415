"""Quantize-on-load: empty 4-bit shells filled by load_state_dict / load_safetensors, never a full-precision model."""

from __future__ import annotations

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from bitsandbytes.functional import quantize_4bit
from conftest import build_tiny_llama, tiny_llama_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaForCausalLM

from lightning_qlora import LoRA, NF4Precision
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.memory.footprint import measure_footprint
from lightning_qlora.quantization.loading import deferred_layers, finalize_deferred
from lightning_qlora.quantization.nf4 import is_4bit_linear
from lightning_qlora.quantization.shells import quantize_model

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantized_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_LINEARS]


def assert_bits_equal_direct_quantization(model: nn.Module, reference: nn.Module) -> int:
    """Every projection of ``model`` holds exactly bitsandbytes' quantize_4bit of the reference weight, cast to the
    model's dtype first (as transformers' ``from_pretrained(dtype=...)`` does)."""
    checked = 0
    for name in quantized_linear_names(reference):
        layer = model.get_submodule(name)
        layer = layer.base_layer if isinstance(layer, LoRALinear) else layer
        assert is_4bit_linear(layer) and isinstance(layer.weight, bnb.nn.Params4bit), name
        model_dtype = next(p.dtype for n, p in model.named_parameters() if "norm" in n)
        assert layer.weight.quant_state.dtype == model_dtype, name  # dequantizes straight to the model's dtype
        packed, state = quantize_4bit(
            reference.get_submodule(name).weight.data.to(model_dtype),
            blocksize=64,
            compress_statistics=True,
            quant_type="nf4",
        )
        assert torch.equal(layer.weight.data, packed), name
        ours = layer.weight.quant_state
        assert ours.nested and torch.equal(ours.absmax, state.absmax) and torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.state2.absmax, state.state2.absmax)
        checked += 1
    return checked


def real_float_bytes(model: nn.Module) -> int:
    return sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if p.device.type != "meta" and p.is_floating_point() and not isinstance(p, bnb.nn.Params4bit)
    )


@pytest.fixture(scope="module")
def reference():
    return build_tiny_llama()


def test_init_module_builds_empty_shells_then_quantizes_each_loaded_weight(reference):
    plugin = NF4Precision(compute_dtype="bf16")
    trainer = L.Trainer(plugins=[plugin], logger=False, enable_progress_bar=False, enable_model_summary=False)
    with trainer.init_module(empty_init=True):
        model = LlamaForCausalLM(tiny_llama_config())

    shells = dict(deferred_layers(model))
    assert set(shells) == {*quantized_linear_names(reference), "lm_head"}
    assert all(shell.weight.device.type == "meta" for shell in shells.values())
    # nothing but embeddings and norms holds real memory: no full-precision linear weight was ever allocated
    embed = reference.model.embed_tokens.weight.numel()
    norms = sum(m.weight.numel() for n, m in reference.named_modules() if "norm" in n)
    assert real_float_bytes(model) == (embed + norms) * 2  # bf16, the compute dtype

    model.load_state_dict(reference.state_dict())
    assert assert_bits_equal_direct_quantization(model, reference) == 14
    trainer.precision_plugin.convert_module(model)  # what the strategy does at setup: finalize, nothing to quantize

    assert type(model.lm_head) is nn.Linear  # the skipped head keeps its loaded weight unquantized
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight.to(model.lm_head.weight.dtype))
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight.to(torch.bfloat16))
    assert assert_bits_equal_direct_quantization(model, reference) == 14
    assert not deferred_layers(model) or all(isinstance(m.weight, bnb.nn.Params4bit) for _, m in deferred_layers(model))


class LoadsInConfigureModel(L.LightningModule):
    def __init__(self, state_dict):
        super().__init__()
        self.state = state_dict
        self.model = None
        self.shell_devices: set[str] = set()

    def configure_model(self):
        if self.model is not None:
            return
        self.model = LlamaForCausalLM(tiny_llama_config())
        self.shell_devices = {m.weight.device.type for n, m in deferred_layers(self.model)}
        self.model.load_state_dict(self.state)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_configure_model_quantizes_on_load_inside_trainer_fit(reference):
    module = LoadsInConfigureModel(reference.state_dict())
    ids = torch.randint(4, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(
        plugins=[NF4Precision()],
        callbacks=[LoRA(r=4, dropout=0.0)],
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    assert module.shell_devices == {"meta"}
    assert assert_bits_equal_direct_quantization(module.model, reference) == 14
    assert type(module.model.lm_head) is nn.Linear
    assert torch.equal(module.model.lm_head.weight, reference.lm_head.weight.to(module.model.lm_head.weight.dtype))
    assert len([m for m in module.modules() if isinstance(m, LoRALinear)]) == 14


def test_checkpoint_loads_through_transformers_with_every_weight_quantized_on_arrival(reference, tmp_path):
    from lightning_qlora.models.sources import load_causal_lm
    from lightning_qlora.quantization.nf4 import QuantizationConfig

    reference.save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, QuantizationConfig())  # transformers' from_pretrained + our quantizer
    assert assert_bits_equal_direct_quantization(model, reference) == 14
    assert type(model.lm_head) is nn.Linear  # the skipped head keeps its weight unquantized
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight.to(model.lm_head.weight.dtype))
    ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert logits.shape == (2, 12, 512) and torch.isfinite(logits).all()


def test_tied_head_stays_tied_and_unquantized_on_load(tmp_path):
    reference = build_tiny_llama(tie_word_embeddings=True)
    plugin = NF4Precision(compute_dtype="bf16")
    with plugin.module_init_context():
        model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight

    model.load_state_dict(reference.state_dict())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives loading
    plugin.convert_module(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight.to(torch.bfloat16))
    assert assert_bits_equal_direct_quantization(model, reference) == 14
    # the shared matrix is counted once
    assert plugin.footprint.unquantized_params == sum(p.numel() for p in reference.parameters() if p.dim() != 2) + (
        reference.model.embed_tokens.weight.numel()
    )

    # from a Hugging Face save (which leaves the tied head out of the file), loaded by transformers
    from lightning_qlora.models.sources import load_causal_lm
    from lightning_qlora.quantization.nf4 import QuantizationConfig

    reference.save_pretrained(tmp_path)
    streamed = load_causal_lm(tmp_path, QuantizationConfig())
    plugin.convert_module(streamed)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    assert torch.equal(streamed.lm_head.weight, reference.lm_head.weight.to(torch.bfloat16))
    assert assert_bits_equal_direct_quantization(streamed, reference) == 14


def test_prequantized_state_dict_keeps_its_bits(reference):
    source = build_tiny_llama()
    quantize_model(source)
    plugin = NF4Precision(compute_dtype="bf16")  # quantize_model's default compute dtype
    with plugin.module_init_context():
        model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(source.state_dict())
    plugin.convert_module(model)
    for name in quantized_linear_names(source):
        ours, theirs = model.get_submodule(name).weight, source.get_submodule(name).weight
        assert torch.equal(ours.data, theirs.data)
        assert torch.equal(ours.quant_state.absmax, theirs.quant_state.absmax)
    x = torch.randn(2, 64)
    layer, src = model.model.layers[0].mlp.up_proj, source.model.layers[0].mlp.up_proj
    with torch.no_grad():
        assert torch.equal(layer(x), src(x))


def test_finalize_materialises_shells_nothing_was_loaded_into():
    with NF4Precision().module_init_context():
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[0].load_state_dict({"weight": torch.randn(64, 64), "bias": torch.randn(64)})
    assert finalize_deferred(model) == ["1"]
    assert all(isinstance(m.weight, bnb.nn.Params4bit) and m.weight.device.type == "cpu" for m in model)


def _one_line_error(fn, *needles):
    with pytest.raises(ValueError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------- random init and bounded peaks
def test_materialize_random_fills_each_shell_once_deterministically():
    from lightning_qlora.quantization.loading import materialize_random

    bits = []
    for _ in range(2):
        plugin = NF4Precision()
        with plugin.module_init_context():
            model = LlamaForCausalLM(tiny_llama_config())
        filled = materialize_random(model, 0.05, torch.Generator().manual_seed(3))
        assert len(filled) == 15 and filled[-1] == "lm_head"  # 14 projections + the head (kept full precision)
        assert materialize_random(model, 0.05) == []  # nothing left empty: idempotent
        plugin.convert_module(model)
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight.std().item() == pytest.approx(0.05, rel=0.1)
        bits.append(model.model.layers[1].self_attn.o_proj.weight.data.clone())
    assert torch.equal(bits[0], bits[1])
    with pytest.raises(ValueError, match="must be a positive number"):
        materialize_random(model, -1.0)


def test_checkpoint_load_peak_is_the_4bit_model_plus_about_one_layer(tmp_path):
    from lightning_qlora.memory.tracker import LiveTensorTracker
    from lightning_qlora.models.sources import load_causal_lm
    from lightning_qlora.quantization.nf4 import QuantizationConfig

    config = tiny_llama_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=8)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # fp32 safetensors, 8 layers, loaded by transformers
    fp32_linears = 8 * 4 * (4 * 512 * 512 + 3 * 512 * 1024)
    largest = 4 * 512 * 1024
    with LiveTensorTracker() as tracker:
        model = load_causal_lm(tmp_path, QuantizationConfig())
    footprint = measure_footprint(model)
    assert tracker.current <= footprint.total_bytes + 4096  # what stays is the model (plus rotary buffers)
    assert tracker.peak < footprint.total_bytes + 3 * largest < fp32_linears / 2


def test_causal_lm_random_init_trains_from_a_config_json(tmp_path):
    from lightning_qlora.models.causal_lm import CausalLM

    tiny_llama_config().save_pretrained(tmp_path)
    module = CausalLM(model=str(tmp_path / "config.json"), init="random", lr=1e-3)
    ids = torch.randint(4, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": ids, "labels": ids}], batch_size=None)
    trainer = L.Trainer(
        plugins=[NF4Precision()],
        callbacks=[LoRA(r=4, dropout=0.0)],
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    assert sum(is_4bit_linear(m) for m in module.modules()) == 14
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    with pytest.raises(ValueError, match="init='zeros'"):
        CausalLM(model=str(tmp_path), init="zeros")
