"""What only a GPU shows (marked ``gpu``, skipped without CUDA): the CUDA kernels behind the CPU-tested paths.

Run on a GPU machine with ``python -m pytest -m gpu tests/test_cuda.py``. Each test compares against the same
references as its CPU twin: bitsandbytes' own quantize/dequantize, a float64 recompute, the rows alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_nf4_codes_on_cuda_equal_bitsandbytes_quantize_4bit():
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, linear_to_4bit

    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=False, dtype=torch.bfloat16)
    want, state = quantize_4bit(linear.weight.data.cuda(), quant_type="nf4", blocksize=64, compress_statistics=True)
    layer = linear_to_4bit(linear, QuantizationConfig(), "cuda")
    assert layer.weight.device.type == "cuda" and torch.equal(layer.weight.data.flatten(), want.flatten())
    assert torch.equal(dequantize_weight(layer, torch.bfloat16), dequantize_4bit(want, state))


def test_fused_lora_on_cuda_matches_a_float64_recompute_within_bf16_tolerance():
    from bitsandbytes.functional import dequantize_4bit

    from lightning_qlora.lora.layer import LoRALinear
    from lightning_qlora.quantization.nf4 import QuantizationConfig, linear_to_4bit

    torch.manual_seed(0)
    linear = nn.Linear(256, 384)
    base = linear_to_4bit(linear, QuantizationConfig(compute_dtype=torch.bfloat16), "cuda")
    layer = LoRALinear(base, r=16, alpha=32, dropout=0.0).cuda()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(4, 64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    w0 = dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    x64 = x.detach().double().requires_grad_(True)
    a, b = (p.detach().double().requires_grad_(True) for p in (layer.lora_A, layer.lora_B))
    ref = x64 @ w0.T + layer.scaling * (x64 @ a.T) @ b.T + base.bias.double()
    ref.sum().backward()
    for got, want in ((y, ref), (x.grad, x64.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 2**-7


def test_packed_rows_stay_apart_under_cuda_sdpa():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_qlora.data.packing import PackedCollator

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(4, 512, (n,), generator=g).tolist()} for n in (13, 9, 10)]
    for row in rows:
        row["labels"] = row["input_ids"]
    batch = {k: v.cuda() for k, v in PackedCollator(pad_id=3)([rows]).items()}
    changed = batch["input_ids"].clone()
    changed[0, :13] = (changed[0, :13] + 1) % 512
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        b = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=batch["input_ids"][:, 13:22], use_cache=False).logits
    assert torch.equal(a[0, 13:], b[0, 13:])
    assert torch.allclose(a[0, 13:22].float(), alone[0].float(), atol=2e-2)


def test_a_packed_fit_on_cuda_with_paged_adamw_and_checkpointing(tiny_llama_dir, tmp_path):
    import lightning.pytorch as pl

    from lightning_qlora import CausalLM, InstructionDataModule, LoRA, NF4Precision, PagedOptimizerStrategy

    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} " * (1 + i % 5)} for i in range(24)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        default_root_dir=tmp_path,
        max_steps=4,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        plugins=[NF4Precision()],
        strategy=PagedOptimizerStrategy("paged_adamw_32bit"),
        callbacks=[LoRA(r=8, dropout=0.1, gradient_checkpointing=True), Record()],
    )
    model = CausalLM(model=str(tiny_llama_dir), lr=5e-3)
    trainer.fit(model, datamodule=InstructionDataModule(str(data), max_length=96, val_split=4, packing=True))
    assert trainer.global_step == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert type(trainer.optimizers[0]).__name__ == "PagedAdamW32bit" and model._packing_checked
    assert NF4Precision().config.compute_dtype == torch.bfloat16  # auto: bf16 on a GPU that has it
