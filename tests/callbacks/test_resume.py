"""Exact resume: real processes (forks of this one) killed with SIGKILL at several points, resumed from ``last``."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import resume_worker
import torch
from conftest import Forked
from safetensors.torch import load_file

from lightning_qlora.callbacks.resume import ExactResume, step_seed
from lightning_qlora.cli.main import main as cli_main
from lightning_qlora.data.loader import ResumableDataLoader

MAX_STEPS = 10  # 12 packs of two rows per epoch, 2 per batch, 2 batches per step: epochs end at steps 3, 6, 9
DPO_STEPS = 5  # 24 pairs per epoch, 2 per batch, 2 batches per step; validated every 5 batches


@pytest.fixture(scope="module")
def workload(tmp_path_factory, tiny_llama_dir) -> dict:
    root = tmp_path_factory.mktemp("resume")
    rows = [
        {"instruction": f"Spell word {i}.", "input": "", "output": f"The word is {'abcdefghij'[i % 10] * (1 + i % 3)}."}
        for i in range(28)
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model_dir": str(tiny_llama_dir), "data": str(data)}


def run_worker(
    workload: dict, name: str, kill: str = "none", resume: bool = False, objective: str | None = None
) -> subprocess.CompletedProcess:
    spec = {
        "root": str(workload["root"] / name),
        "model_dir": workload["model_dir"],
        "data": workload["data"],
        "max_steps": DPO_STEPS if objective else MAX_STEPS,
        "kill": kill,
        "resume": resume,
        "packing": True,  # packed batches (two rows per sequence): positions, labels and packs must resume exactly
        "objective": objective,  # a PreferenceLM on pairs of the same rows instead (packing does not apply)
    }
    tag = f"{name}-{kill.replace(':', '')}-{int(resume)}"
    path = workload["root"] / f"{tag}.json"
    path.write_text(json.dumps(spec))
    return Forked(lambda: resume_worker.main(str(path)), workload["root"] / "logs", tag).output(timeout=180)


def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "adapter" / "adapter_model.safetensors")


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), (key, (a[key] - b[key]).abs().max())


def val_history(stdout: str, key: str = "val_history") -> list:
    return json.loads(stdout.split(f"\n{key}=")[1].splitlines()[0])


@pytest.fixture(scope="module")
def uninterrupted(workload) -> dict[str, torch.Tensor]:
    done = run_worker(workload, "baseline")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"finished at step {MAX_STEPS}" in done.stdout
    workload["val_history"] = val_history(done.stdout)
    return adapter(workload["root"] / "baseline")


def test_killed_four_times_then_resumed_gives_the_same_adapter_bits(workload, uninterrupted):
    """One run killed (SIGKILL) at four points and resumed from ``last`` after each, then finished."""
    root = workload["root"] / "killed"
    ckpt = root / "checkpoints" / "last.ckpt"
    kills = [
        ("forward:2", 2),  # mid gradient-accumulation window of step 3: last is step 2
        ("save:4", 3),  # temp file of step 4's checkpoint complete but never renamed: last stays step 3, the end of
        # epoch 0 (Lightning alone would resume that at epoch 2: ExactResume clears its last-batch flag)
        ("write:6", 5),  # torn write of step 6's checkpoint (an epoch boundary): last stays step 5
        ("after_step:8", 7),  # step 8 applied, killed before its checkpoint: last is step 7
    ]
    for i, (kill, last_step) in enumerate(kills):
        died = run_worker(workload, "killed", kill=kill, resume=i > 0)
        assert died.returncode == -signal.SIGKILL, (kill, died.stderr[-2000:])
        saved = torch.load(ckpt, weights_only=True, map_location="cpu")  # `last` is complete and readable
        assert saved["global_step"] == last_step, kill
    leftovers = sorted(p.name for p in (root / "checkpoints").iterdir() if ".tmp-" in p.name)
    assert leftovers, "the save kills should have left temp files behind"
    assert not (root / "adapter").exists()  # no export from a killed run
    done = run_worker(workload, "killed", resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"finished at step {MAX_STEPS}" in done.stdout
    assert_bit_identical(adapter(root), uninterrupted)
    # validation ran at the same steps with the same losses, and the history survived four restarts
    assert val_history(done.stdout) == workload["val_history"] and len(workload["val_history"]) >= 3
    before = adapter(workload["root"] / "baseline")  # and training moved the adapter away from B = 0
    assert any(k.endswith("lora_B.weight") and before[k].abs().max() > 0 for k in before)


def test_dpo_killed_then_resumed_gives_the_same_adapter_bits(workload):
    """PreferenceLM (DPO: a reference forward with adapters off each step, dropout 0.1) killed mid-run and resumed."""
    baseline = run_worker(workload, "dpo_baseline", objective="dpo")
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    assert f"finished at step {DPO_STEPS}" in baseline.stdout
    root = workload["root"] / "dpo_killed"
    # killed mid gradient-accumulation window of step 3, after the validation of batch 5 (not in `last`: redone)
    died = run_worker(workload, "dpo_killed", kill="forward:2", objective="dpo")
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == 2 and [s for s, _ in saved["preference_history"]] == []
    done = run_worker(workload, "dpo_killed", resume=True, objective="dpo")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"finished at step {DPO_STEPS}" in done.stdout
    expected = adapter(workload["root"] / "dpo_baseline")
    assert_bit_identical(adapter(root), expected)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in expected.items())  # it trained
    history = val_history(baseline.stdout, "preference_history")  # every 5 batches: after steps 2 and 5
    assert [step for step, _ in history] == [2, 5] and all(values["margins"] != 0 for _, values in history)
    assert val_history(done.stdout, "preference_history") == history  # the same numbers after the restart


@pytest.mark.slow
def test_cli_killed_at_a_random_moment_resumes_with_ckpt_path_last(workload, tmp_path):
    """``lightning-qlora fit --config ... --ckpt_path last`` after an external ``kill -9`` at a random moment."""
    config = tmp_path / "fit.yaml"
    config.write_text(
        f"""seed_everything: 5
trainer:
  max_steps: 14
  accumulate_grad_batches: 2
  num_sanity_val_steps: 0
  val_check_interval: 6
  check_val_every_n_epoch: null
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  plugins: [{{class_path: lightning_qlora.NF4Precision}}]
  strategy: {{class_path: lightning_qlora.PagedOptimizerStrategy}}
  callbacks:
    - {{class_path: lightning_qlora.LoRA, init_args: {{r: 8, dropout: 0.1, export_dir: ADAPTER}}}}
    - {{class_path: lightning_qlora.ExactResume}}
    - {{class_path: lightning_qlora.ResumableCheckpoint, init_args: {{dirpath: CKPTS, every_n_train_steps: 1}}}}
model:
  class_path: lightning_qlora.CausalLM
  init_args: {{model: {workload["model_dir"]}, dtype: fp32, lr: 0.005}}
data:
  class_path: lightning_qlora.InstructionDataModule
  init_args: {{path: {workload["data"]}, batch_size: 2, max_length: 64, val_split: 4}}
"""
    )

    def fit(name: str, *extra: str) -> Forked:
        text = config.read_text().replace("ADAPTER", str(tmp_path / name / "adapter"))
        text = text.replace("CKPTS", str(tmp_path / name / "ckpts"))
        (tmp_path / f"{name}.yaml").write_text(text)
        (tmp_path / name).mkdir(exist_ok=True)
        args = ["fit", "--config", str(tmp_path / f"{name}.yaml"), *extra]
        return Forked(lambda: cli_main(args), tmp_path / "logs", f"{name}{len(extra)}", cwd=tmp_path / name)

    baseline = fit("baseline")
    victim = fit("victim")
    last = tmp_path / "victim" / "ckpts" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))  # somewhere in steps 2..14
    victim.kill()
    assert baseline.wait(timeout=180) == 0, baseline.output().stderr[-2000:]
    resumed = fit("victim", "--ckpt_path", "last").output(timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bit_identical(
        load_file(tmp_path / "victim" / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "baseline" / "adapter" / "adapter_model.safetensors"),
    )


# ------------------------------------------------------------------------------------------- unit: the two pieces
def test_resumable_loader_skips_the_trained_batches_of_the_saved_epoch_only():
    data = list(range(20))
    position = {"epoch": 1, "batches": 3}
    loader = ResumableDataLoader(data, batch_size=4, progress=lambda: (position["epoch"], position["batches"]))
    assert loader.state_dict() == {"epoch": 1, "batches": 3}
    loader.load_state_dict({"epoch": 1, "batches": 3})
    assert [b.tolist() for b in loader] == [[12, 13, 14, 15], [16, 17, 18, 19]]
    assert len(list(loader)) == 5  # the skip applies once
    loader.load_state_dict({"epoch": 0, "batches": 3})  # saved at the end of an earlier epoch: nothing to skip
    assert len(list(loader)) == 5
    assert ResumableDataLoader(data, batch_size=4).state_dict() == {}


def test_exact_resume_reseeds_each_batch_from_seed_epoch_and_index():
    class FakeTrainer:
        current_epoch = 2
        global_rank = 0

    callback = ExactResume(seed=3)
    callback.on_train_batch_start(FakeTrainer(), None, None, 5)  # type: ignore[arg-type]
    first = torch.rand(3)
    torch.rand(100)  # anything drawn in between (validation, a new iterator) does not matter
    callback.on_train_batch_start(FakeTrainer(), None, None, 5)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), first)
    torch.manual_seed(step_seed(3, 2, 5))
    assert torch.equal(torch.rand(3), first)
    assert len({step_seed(3, 2, 5), step_seed(3, 2, 6), step_seed(3, 3, 5), step_seed(3, 2, 5, rank=1)}) == 4
    resumed = ExactResume(seed=None)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.seed == 3


def test_resuming_on_other_data_or_batch_size_says_it_is_not_exact():
    from types import SimpleNamespace

    from lightning_qlora.callbacks.resume import ExactResume

    def trainer(batches, rows):
        loader = SimpleNamespace(dataset=list(range(rows)))
        return SimpleNamespace(num_training_batches=batches, train_dataloader=loader,
                               fit_loop=SimpleNamespace(_combined_loader=SimpleNamespace(flattened=[])))  # fmt: skip

    first = ExactResume(seed=1)
    first.on_train_start(trainer(60, 240), None)
    state = first.state_dict()
    assert state == {"seed": 1, "data": {"batches": 60, "rows": 240}}
    same = ExactResume()
    same.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.on_train_start(trainer(60, 240), None)
    other = ExactResume()
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="trained on 240 rows in 60 batches an epoch, this run has 240 rows in 120"):
        other.on_train_start(trainer(120, 240), None)
