"""LMEvalCallback inside a real (tiny) Trainer.fit: metrics in the CSV log, JSON next to checkpoints, modes."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import build_tiny_llama
from lightning.pytorch.loggers import CSVLogger

from lightning_qlora.evaluation import DEMO_TASK, EvaluationError, LMEvalCallback


@pytest.fixture(autouse=True)
def _skip_env_report(monkeypatch):
    """lm-eval's `add_env_info` shells out to `pip list` on every run (~1-2 s); not what these tests check."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


class TinyCausalLM(pl.LightningModule):
    """Just what the bridge relies on: `.model`, `.tokenizer`, and a trivial training step."""

    def __init__(self, tokenizer):
        super().__init__()
        self.model = build_tiny_llama()
        self.tokenizer = tokenizer
        self.train_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.train_modes.append(self.model.training)
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        ids = torch.tensor(self.tokenizer.encode("the cat sat on the mat; the dog sat on the log"))
        return torch.utils.data.DataLoader([ids] * 8, batch_size=2)


def _trainer(tmp_path, callback, **overrides):
    kw = dict(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**kw, **overrides})


def test_callback_logs_writes_json_and_restores_train_mode(tmp_path, tiny_tokenizer):
    callback = LMEvalCallback(
        tasks=[DEMO_TASK], num_fewshot=1, limit=4, batch_size=4, every_n_train_steps=1, on_fit_start=True
    )
    module = TinyCausalLM(tiny_tokenizer)
    trainer = _trainer(tmp_path, callback)
    trainer.fit(module)

    assert module.train_modes == [True, True]  # the step after an evaluation still trains in train mode
    assert module.training and module.model.training
    ckpt_dir = trainer.checkpoint_callback.dirpath
    written = sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.json"))
    assert written == ["lm_eval_step0.json", "lm_eval_step1.json", "lm_eval_step2.json"]  # fit end deduplicated
    assert callback.last_output_path.parent == type(callback.last_output_path)(ckpt_dir)
    saved = json.loads(callback.last_output_path.read_text())
    assert saved["results"][DEMO_TASK]["sample_len"] == 4 and saved["n-shot"][DEMO_TASK] == 1
    assert callback.last_results["results"][DEMO_TASK]["acc,none"] == saved["results"][DEMO_TASK]["acc,none"]
    assert callback.last_metrics[f"lm_eval/{DEMO_TASK}/acc"] == saved["results"][DEMO_TASK]["acc,none"]

    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    key = f"lm_eval/{DEMO_TASK}/acc"
    assert {f"lm_eval/{DEMO_TASK}/acc_stderr", f"lm_eval/{DEMO_TASK}/acc_norm"} <= set(rows[0])
    logged = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    assert sorted(logged) == [0, 1, 2]
    assert logged[2] == saved["results"][DEMO_TASK]["acc,none"]


def test_callback_output_dir_and_epoch_schedule(tmp_path, tiny_tokenizer):
    out = tmp_path / "evals"
    callback = LMEvalCallback(tasks=DEMO_TASK, num_fewshot=0, limit=2, every_n_epochs=1, output_dir=out)
    module = TinyCausalLM(tiny_tokenizer)
    trainer = _trainer(
        tmp_path, callback, enable_checkpointing=False, max_steps=-1, max_epochs=1, limit_train_batches=2
    )
    trainer.fit(module)
    assert sorted(p.name for p in out.glob("*.json")) == ["lm_eval_step2.json"]  # epoch end; fit end deduplicated
    assert callback.resolve_output_dir(trainer) == out


def test_typo_fails_at_setup_before_training(tmp_path, tiny_tokenizer):
    module = TinyCausalLM(tiny_tokenizer)
    trainer = _trainer(tmp_path, LMEvalCallback(tasks=["qlora_demo_mcq"], num_fewshot=0))
    with pytest.raises(EvaluationError, match=r"unknown lm-eval task 'qlora_demo_mcq'.*qlora_demo_mc"):
        trainer.fit(module)
    assert module.train_modes == []


def test_bad_arguments():
    with pytest.raises(EvaluationError, match="every_n_train_steps"):
        LMEvalCallback(every_n_train_steps=0)
    with pytest.raises(EvaluationError, match="num_fewshot"):
        LMEvalCallback(num_fewshot=-1)


class _Strategy:
    def __init__(self, from_rank0):
        self.calls = []
        self.from_rank0 = from_rank0

    def barrier(self, name=None):
        self.calls.append("barrier")

    def broadcast(self, obj, src=0):
        self.calls.append("broadcast")
        return self.from_rank0


def test_non_zero_rank_waits_and_shares_rank0_outcome():
    """Rank > 0 never evaluates: it waits at the barrier, then takes rank 0's metrics or raises its error."""
    callback = LMEvalCallback(tasks=[DEMO_TASK])
    ok = _Strategy((None, {"lm_eval/x/acc": 0.5}))
    trainer = SimpleNamespace(sanity_checking=False, global_step=3, is_global_zero=False, strategy=ok, loggers=[])
    callback._run(trainer, pl_module=None, when="step")
    assert ok.calls == ["barrier", "broadcast"] and callback.last_metrics == {"lm_eval/x/acc": 0.5}
    failed = _Strategy(("EvaluationError: boom", {}))
    trainer.strategy = failed
    with pytest.raises(EvaluationError, match="rank 0: EvaluationError: boom"):
        callback._run(trainer, pl_module=None, when="step")
    assert failed.calls == ["barrier", "broadcast"]


def test_state_roundtrip_and_unique_state_keys():
    a = LMEvalCallback(tasks=["mmlu"], num_fewshot=5)
    b = LMEvalCallback(tasks=[DEMO_TASK], num_fewshot=5)
    assert a.state_key != b.state_key
    a._last_eval_step, a.last_metrics = 500, {"lm_eval/mmlu/acc": 0.25}
    c = LMEvalCallback(tasks=["mmlu"], num_fewshot=5)
    c.load_state_dict(a.state_dict())
    assert c.state_key == a.state_key and c._last_eval_step == 500 and c.last_metrics == a.last_metrics


def test_resumed_summary_still_compares_with_step_0():
    """The first evaluation travels in the checkpoint: after a resume, "before" is step 0's, not the resume step's."""
    key = f"lm_eval/{DEMO_TASK}/acc"
    first = LMEvalCallback(tasks=[DEMO_TASK])
    first.history = [(0, {key: 0.25}), (20, {key: 0.30})]
    first._last_eval_step, first.last_metrics = 20, {key: 0.30}
    resumed = LMEvalCallback(tasks=[DEMO_TASK])
    resumed.load_state_dict(torch.load(_saved(first.state_dict()), weights_only=True))  # as a checkpoint holds it
    resumed.history.append((40, {key: 0.35}))
    assert resumed.summary_rows() == {f"lm-eval {DEMO_TASK} acc": "0.250 (step 0) -> 0.350 (step 40)"}


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
