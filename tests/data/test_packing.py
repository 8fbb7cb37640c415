"""Packing (lightning_qlora.data.packing and InstructionDataModule(packing=True)): which rows share a sequence,
the packed batch's tensors, epochs, distributed shards and training through the Trainer."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer

from lightning_qlora import CausalLM, InstructionDataModule, LoRA
from lightning_qlora.data.packing import PackDataset, PackedCollator, PackedSampler, plan_packs
from lightning_qlora.data.prompts import DataError


def test_every_row_lands_in_exactly_one_pack_that_fits():
    lengths = [random.Random(i).randint(1, 200) for i in range(500)]
    packs = plan_packs(lengths, 256, seed=3)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 256 for pack in packs)
    assert len(packs) <= math.ceil(sum(lengths) / 256) * 1.05  # best-fit decreasing: within 5% of the bound here
    assert all(lengths[p[0]] >= lengths[p[-1]] for p in packs)  # rows longest first inside a pack


def test_packs_are_a_pure_function_of_the_seed():
    lengths = [random.Random(i).randint(1, 60) for i in range(200)]
    assert plan_packs(lengths, 64, seed=1) == plan_packs(lengths, 64, seed=1)
    other = plan_packs(lengths, 64, seed=2)
    assert other != plan_packs(lengths, 64, seed=1) and len(other) == len(plan_packs(lengths, 64, seed=1))
    sampler = PackedSampler(lengths, 64, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == plan_packs(lengths, 64, seed=6) != first and len(sampler) == len(first)


def test_a_row_longer_than_a_pack_is_refused_in_one_line():
    with pytest.raises(DataError, match=r"row 1 has 70 tokens; packing needs 1..max_length=64 tokens per row: "):
        plan_packs([10, 70], 64, seed=0)


def test_the_collator_restarts_positions_and_ignores_each_rows_first_label():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "index": 4},
        {"input_ids": [8, 9], "labels": [8, 9], "index": 0},  # trained from its first token (no prompt)
        {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13], "index": 2},
    ]
    batch = PackedCollator(pad_id=1, pad_to_multiple_of=4)([rows[:2], rows[2:]])
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 1, 1], [10, 11, 12, 13, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100], [-100, -100, 12, 13] + [-100] * 4]
    assert batch["row_index"].tolist() == [4, 0, 2] and int(batch["num_tokens"]) == 9


@pytest.fixture()
def data_file(tmp_path) -> Path:
    rng = random.Random(0)
    rows = [
        {"instruction": f"Repeat {i}.", "input": "", "output": " ".join(str(i) for _ in range(rng.randint(1, 12)))}
        for i in range(40)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_data_module_packs_every_training_row_once_per_epoch_with_response_only_labels(tiny_tokenizer, data_file):
    padded = InstructionDataModule(str(data_file), max_length=128, val_split=4, batch_size=3).connect(tiny_tokenizer)
    packed = InstructionDataModule(str(data_file), max_length=128, val_split=4, batch_size=3, packing=True)
    packed.connect(tiny_tokenizer).setup("fit")
    padded.setup("fit")
    by_index = {row["index"]: row for row in padded.train_dataset}
    seen, packs = [], 0
    for batch in packed.train_dataloader():
        for b in range(batch["input_ids"].shape[0]):
            starts = (batch["position_ids"][b] == 0).nonzero().flatten().tolist()
            packs += 1
            for start, end in zip(starts, [*starts[1:], batch["input_ids"].shape[1]]):
                ids = batch["input_ids"][b, start:end].tolist()
                matches = [i for i in batch["row_index"].tolist() if by_index[i]["input_ids"] == ids]
                if not matches:  # the padding after the last row
                    assert set(ids) == {tiny_tokenizer.pad_token_id}
                    continue
                row = by_index[matches[0]]
                assert batch["labels"][b, start + 1 : end].tolist() == row["labels"][1:]  # response-only kept
                assert batch["labels"][b, start] == -100
                seen.append(matches[0])
    assert sorted(seen) == sorted(by_index) and packs == packed.stats()["train_packs"]
    assert packs < len(by_index) / 2  # rows of ~40 tokens: about three per sequence
    assert "position_ids" not in next(iter(packed.val_dataloader()))  # validation stays unpacked


def test_distributed_ranks_get_disjoint_packs(tiny_tokenizer, data_file):
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = InstructionDataModule(str(data_file), max_length=64, val_split=4, batch_size=2, packing=True)
    loader = dm.connect(tiny_tokenizer).train_dataloader()
    assert isinstance(loader.sampler, PackedSampler) and isinstance(loader.dataset, PackDataset)
    shards = []
    for rank in (0, 1):  # what Lightning does to a custom sampler under DDP (use_distributed_sampler=True)
        sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank, shuffle=False)
        ranked = _update_dataloader(loader, sampler)
        shards.append([i for batch in ranked for i in batch["row_index"].tolist()])
    packs = list(loader.sampler)
    if len(packs) % 2:  # DistributedSampler repeats the first pack to give both ranks as many
        shards[1] = shards[1][: -len(packs[0])]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(i for pack in packs for i in pack)


def test_packed_training_through_the_trainer_checks_the_model_once_and_counts_real_tokens(
    tiny_llama_dir, data_file, tmp_path
):
    from lightning_qlora import RunSummary

    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    summary = RunSummary()
    trainer = quiet_trainer(tmp_path, [LoRA(r=8, dropout=0.1, gradient_checkpointing=True), summary, Record()], 4)
    model = CausalLM(model=str(tiny_llama_dir), lr=5e-3, dtype="fp32")
    dm = InstructionDataModule(str(data_file), max_length=64, val_split=4, batch_size=2, packing=True)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4 and all(math.isfinite(x) for x in losses) and model._packing_checked
    batches = [b for _, b in zip(range(4), dm.train_dataloader())]
    assert summary.tokens == sum(int(b["num_tokens"]) for b in batches)
    assert summary.tokens < sum(b["input_ids"].numel() for b in batches)  # padding is not counted


def test_a_model_that_mixes_packed_rows_is_refused_at_the_first_step(tiny_tokenizer_dir, data_file, tmp_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from lightning_qlora.models.packed import PackedAttentionError

    folder = tmp_path / "opt"
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64
    )
    OPTForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(folder)
    trainer = quiet_trainer(tmp_path, [LoRA(r=8, export_dir=str(tmp_path / "adapter"))], 2)
    dm = InstructionDataModule(str(data_file), max_length=64, val_split=4, packing=True)
    with pytest.raises(PackedAttentionError, match="OPTForCausalLM lets packed rows attend to each other"):
        trainer.fit(CausalLM(model=str(folder), dtype="fp32"), datamodule=dm)
    assert trainer.global_step == 0 and not (tmp_path / "adapter").exists()
