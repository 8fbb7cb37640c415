"""Bits per quantized parameter and bytes by kind of tensor, checked against the arithmetic of the format."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from conftest import build_tiny_llama
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRA, NF4Precision, measure_footprint
from lightning_qlora.lora.layer import LoRAConfig, inject_lora
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.quantization.shells import quantize_model

NF4_TABLE_BYTES = 16 * 4  # the 16-value NF4 code table (fp32)
DQ_TABLE_BYTES = 256 * 4  # the 8-bit dynamic map of the nested state (fp32)


def big_layer(double_quant: bool) -> nn.Module:
    """One 2048×2048 layer: large enough that the two constant code tables (1.1 KiB) cost < 0.003 bits/param."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048, bias=False))
    quantize_model(model, QuantizationConfig(double_quant=double_quant))
    return model


def test_nf4_double_quant_costs_at_most_4_13_bits_per_parameter():
    n = 2048 * 2048
    footprint = measure_footprint(big_layer(double_quant=True))
    assert footprint.quantized_params == n
    codes, absmax8, absmax2, offset = n // 2, n // 64, 4 * (n // 64 // 256), 4
    assert footprint.quantized_bytes == codes + absmax8 + absmax2 + offset + NF4_TABLE_BYTES + DQ_TABLE_BYTES
    # the paper's 4 + 8/64 + 32/(64·256) ≈ 4.127 plus the tables
    assert 4 + 8 / 64 + 32 / (64 * 256) <= footprint.bits_per_quantized_param <= 4.13
    assert footprint.unquantized_params == footprint.adapter_params == 0


def test_without_double_quant_it_is_4_5_bits():
    n = 2048 * 2048
    footprint = measure_footprint(big_layer(double_quant=False))
    assert footprint.quantized_bytes == n // 2 + 4 * (n // 64) + NF4_TABLE_BYTES
    assert footprint.bits_per_quantized_param == pytest.approx(4.5, abs=2e-4)


def test_bytes_by_kind_on_a_llama_with_adapters():
    model = build_tiny_llama()
    reference = {n: p.numel() for n, p in model.named_parameters()}
    quantized_names = quantize_model(model)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    footprint = measure_footprint(model)

    quantized = sum(reference[f"{n}.weight"] for n in quantized_names)
    unquantized = sum(v for k, v in reference.items() if k.rsplit(".", 1)[0] not in quantized_names)
    adapters = sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert footprint.quantized_params == quantized == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert footprint.unquantized_params == unquantized  # embeddings, norms and the head
    assert footprint.unquantized_bytes == 4 * unquantized
    assert footprint.adapter_params == adapters and footprint.adapter_bytes == 4 * adapters
    assert footprint.total_bytes == footprint.quantized_bytes + footprint.unquantized_bytes + footprint.adapter_bytes
    assert 4.0 < footprint.bits_per_quantized_param < 5.0
    as_dict = footprint.as_dict()
    assert as_dict["adapter_params"] == adapters and as_dict["bits_per_quantized_param"] == pytest.approx(
        footprint.bits_per_quantized_param
    )
    assert "bits/param" in footprint.summary() and "\n" not in footprint.summary()


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = build_tiny_llama()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_footprint_is_logged_at_fit_start(caplog):
    plugin = NF4Precision()
    module = LM()
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(
        plugins=[plugin],
        callbacks=[LoRA(r=4, dropout=0.0)],
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=2))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NF4Precision:")]
    assert len(lines) == 1
    assert plugin.footprint is not None and plugin.footprint.summary() in lines[0]
    assert plugin.footprint == measure_footprint(module)  # base and adapter sizes do not change while training
    assert plugin.footprint.adapter_params == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192)


def test_share_of_matmul_weights_in_4_bits():
    model = build_tiny_llama()
    quantize_model(model)
    footprint = measure_footprint(model)
    assert footprint.matmul_share_4bit == 1.0  # every projection; the head is not a matmul weight we count
    assert "100.0% of the matmul weights in 4 bits" in footprint.summary()
    partial = build_tiny_llama()
    quantize_model(partial, QuantizationConfig(skip_modules=("lm_head", "q_proj")))
    q_proj = sum(m.weight.numel() for n, m in partial.named_modules() if n.endswith("q_proj"))
    share = measure_footprint(partial).matmul_share_4bit
    assert share == pytest.approx(1 - q_proj / sum(p.numel() for n, p in build_tiny_llama().named_parameters()
                                                  if "proj" in n), rel=1e-9)  # fmt: skip
