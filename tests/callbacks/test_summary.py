"""RunSummary: the end-of-fit table, with the planner's prediction next to the measured peak."""

import re

import lightning as L
import torch
from conftest import TinyMLP
from torch.utils.data import DataLoader

from lightning_qlora import LoRA, NF4Precision, PagedOptimizerStrategy, RunSummary
from lightning_qlora.callbacks.summary import plan_for_run
from lightning_qlora.memory.footprint import measure_footprint
from lightning_qlora.models.causal_lm import CausalLM
from lightning_qlora.utils.formatting import format_bytes


def _fit(module, batches, callbacks, root):
    trainer = L.Trainer(
        default_root_dir=root,
        plugins=[NF4Precision()],
        strategy=PagedOptimizerStrategy(),
        callbacks=callbacks,
        max_steps=len(batches),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def test_summary_prints_the_plan_for_the_largest_batch(tiny_llama_dir, tmp_path, capsys):
    module = CausalLM(model=str(tiny_llama_dir), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": (ids := torch.randint(4, 512, shape, generator=gen)), "labels": ids}
        for shape in [(2, 16), (4, 24), (1, 8)]
    ]
    summary = RunSummary()
    lora = LoRA(r=8, gradient_checkpointing=True)
    trainer = _fit(module, batches, [lora, summary], tmp_path)
    assert summary.batch_shape == (4, 24)
    plan = summary.plan
    footprint = measure_footprint(module)
    assert plan is not None and plan.settings["batch_size"] == 4 and plan.settings["seq_len"] == 24
    assert plan.adapters == footprint.adapter_bytes and plan.quantized_weights == footprint.quantized_bytes
    assert plan.settings["gradient_checkpointing"] and plan.settings["optimizer"] == "paged_adamw_32bit"
    assert plan.paged_optimizer_states == 0  # CPU: the strategy runs unpaged
    out = capsys.readouterr().out
    assert "predicted peak (planner)" in out and "not comparable on CPU" in out
    assert re.search(rf"predicted peak \(planner\) +{re.escape(format_bytes(plan.peak))} of tensors", out), out
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert summary.rows["trainable params"] == f"{trainable:,}" and summary.rows["steps"] == "3"
    assert summary.tokens == sum(b["input_ids"].numel() for b in batches)  # no attention_mask: every token counts
    assert trainer.global_step == 3


def test_no_plan_for_a_model_without_a_transformers_config():
    class MLPModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyMLP()

    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    assert plan_for_run(trainer, MLPModule(), (2, 8)) is None
