"""RunSummary: the end-of-fit table, with the planner's prediction next to the measured peak."""

import re

import lightning as L
import pytest
import torch
from conftest import TinyMLP
from torch.utils.data import DataLoader

from lightning_qlora import LoRA, NF4Precision, PagedOptimizerStrategy, RunSummary
from lightning_qlora.callbacks.summary import plan_for_run
from lightning_qlora.memory.footprint import measure_footprint
from lightning_qlora.memory.planner import MemoryPlan, plan_memory
from lightning_qlora.models.causal_lm import CausalLM
from lightning_qlora.models.preference import PreferenceLM
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


def _pair_batches(shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Batches as PreferenceDataModule builds them: ``2B`` rows (chosen, then rejected), the prompt not scored."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for rows, length in shapes:
        ids = torch.randint(4, 512, (rows, length), generator=gen)
        labels = ids.clone()
        labels[:, : length // 2] = -100  # the shared prompt is not scored
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def _same_plan(a: MemoryPlan, b: MemoryPlan) -> bool:
    fields = ("peak", "activations", "activations_with_checkpointing", "activations_without_checkpointing")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and a.settings["phases"] == b.settings["phases"]


def test_summary_plans_a_preference_run_with_its_reference_pass_and_both_sequences(tiny_llama_dir, tmp_path):
    """A DPO run is planned as ``plan_memory(preference="dpo")`` of the ``2B`` sequences its batches hold (not 4B)."""
    module = PreferenceLM(model=str(tiny_llama_dir), method="dpo", dtype="fp32", lr=1e-3, loss_chunk_size=None)
    summary = RunSummary()
    lora = LoRA(r=8, alpha=16, dropout=0.0)
    trainer = _fit(module, _pair_batches([(4, 24), (2, 16)]), [lora, summary], tmp_path)
    assert summary.batch_shape == (4, 24)  # 2 pairs: 2 chosen + 2 rejected sequences
    direct = dict(lora=lora.config, quantization=trainer.precision_plugin.config, optimizer="paged_adamw_32bit",
                  gradient_checkpointing=False, dtype=torch.float32, loss_chunk_size=None,
                  device_type="cpu")  # fmt: skip
    expected = plan_memory(module.model.config, 4, 24, preference="dpo", **direct)
    assert summary.plan is not None and _same_plan(summary.plan, expected)
    assert summary.plan.settings["batch_size"] == 4 and "reference forward" in summary.plan.settings["phases"]
    for wrong in (
        plan_memory(module.model.config, 4, 24, **direct),  # planned as a supervised step
        plan_memory(module.model.config, 8, 24, preference="dpo", **direct),
    ):  # pairs doubled twice
        assert not _same_plan(summary.plan, wrong) and wrong.peak != expected.peak
    # ORPO: the same step without the reference forward
    module.method = "orpo"
    orpo = plan_for_run(trainer, module, (4, 24))
    assert orpo is not None and _same_plan(orpo, plan_memory(module.model.config, 4, 24, preference="orpo", **direct))
    assert "reference forward" not in orpo.settings["phases"]
    assert not _same_plan(orpo, expected) and not _same_plan(orpo, plan_memory(module.model.config, 4, 24, **direct))
    with pytest.raises(ValueError, match="not a preference method"):  # the method reaches the planner as is
        plan_memory(module.model.config, 4, 24, preference="kto", **direct)
