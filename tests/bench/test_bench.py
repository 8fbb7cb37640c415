"""bench/: qlora_vs_hf.py runs both stacks on one workload and they agree on the loss before any update;
qlora_70b_step.py builds from config.json alone and its measured peak matches the planner."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qlora_vs_hf.py"
ANCHOR = "anchor (HF+peft+bnb)"
OURS = "ours (lightning_qlora)"


def _load(name: str):
    """Import ``bench/<name>.py`` as the scripts see it: bench/ on sys.path, so its sibling modules import too."""
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("qlora_vs_hf")


def test_kept_models_are_reused_only_for_the_same_recipe(bench, tmp_path):
    def run(seed: int) -> list[str]:
        logs: list[str] = []
        bench.run_bench(
            preset="micro", device="cpu", stacks=("ours",), isolate=False, workdir=tmp_path, seed=seed,
            steps=1, warmup=0, keep_models=True, compute_dtype="fp32", log=logs.append,
        )  # fmt: skip
        return logs

    assert run(0)[0].startswith("built 2-layer model")
    weights = tmp_path / "micro-2L" / "model.safetensors"
    built = weights.read_bytes()
    assert run(0)[0].startswith("reusing the 2-layer model") and weights.read_bytes() == built
    assert run(1)[0].startswith("built 2-layer model") and weights.read_bytes() != built  # another seed: rebuilt


def test_quantized_bits_match_hf_bitsandbytes_loading(bench, tmp_path):
    """Our quantize-on-load path stores exactly the codes and constants HF's BitsAndBytesConfig path does."""
    from conftest import load_with_hf_bitsandbytes

    from lightning_qlora.models.sources import load_causal_lm
    from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_weight, is_4bit_linear

    arch = dict(bench.PRESETS["micro"]["arch"])
    bench.build_model_dir(arch, tmp_path / "m", "cpu", init_std=0.08)
    hf = load_with_hf_bitsandbytes(tmp_path / "m")
    ours = load_causal_lm(tmp_path / "m", quantization=QuantizationConfig(), device="cpu", dtype=torch.bfloat16)
    hf_layers = {n: m for n, m in hf.named_modules() if is_4bit_linear(m)}
    our_layers = {n: m for n, m in ours.named_modules() if is_4bit_linear(m)}
    assert sorted(hf_layers) == sorted(our_layers) and len(our_layers) == 7 * arch["num_hidden_layers"]
    for name, layer in our_layers.items():
        assert torch.equal(layer.weight.data, hf_layers[name].weight.data), name
        assert torch.equal(dequantize_weight(layer), dequantize_weight(hf_layers[name])), name
    hf.train()
    ours.train()
    ids = torch.randint(0, arch["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = hf(input_ids=ids, labels=ids).loss
        got = ours(input_ids=ids, labels=ids).loss
    assert torch.equal(got, expected)  # same bits, same bf16 residual stream (no fp32 upcast here): same loss


def test_mfu_counts_4n_and_hfu_6n_flops_per_token(bench):
    """Frozen base: forward 2N + input-gradient backward 2N; checkpointing's recompute adds 2N more."""
    w = bench.Workload(
        name="w",
        model_dir="",
        n_params=1_000_000,
        batch_size=2,
        seq_len=100,
        vocab_size=8,
        steps=3,
        warmup=1,
        device="cpu",
    )

    class Probe:
        def peak(self):
            return 1.0, "test", None

    row = bench.summarize(
        "s",
        w,
        [0.5, 0.1, 0.1],
        [1.0, 1.0, 1.0],
        Probe(),
        peak_tflops=1e-3,
        optimizer="x",
        gc_forward_calls=[2, 2, 2],
        train_mode=True,
        isolated=False,
    )
    assert row.tok_s == pytest.approx(2000)  # 200 tokens / 0.1 s (the median after the warmup)
    assert row.mfu == pytest.approx(4 * 1e6 * 2000 / 1e9)
    assert row.hfu == pytest.approx(6 * 1e6 * 2000 / 1e9)
    line = bench.format_table([row]).splitlines()[2]
    assert f"| {row.mfu * 100:.1f}% | {row.hfu * 100:.1f}% |" in line


def test_fast_path_micro_bench_runs_and_chunking_lowers_the_loss_peak():
    micro = _load("fast_path_micro")
    for fused in (False, True):
        ms = micro.time_layer("cpu", tokens=64, features=64, rank=8, dropout=0.05, fused=fused, iters=1)
        assert math.isfinite(ms) and ms > 0
    full, _ = micro.loss_peak("cpu", 2, 64, 1024, 64, chunk=None)
    chunked, _ = micro.loss_peak("cpu", 2, 64, 1024, 64, chunk=32)
    assert full >= 2 * 64 * 1024 * 6 / 2**20  # bf16 logits + their fp32 copy
    assert chunked * 4 < full


TINY_70B_ARGS = ["--device", "cpu", "--layers", "2", "--hidden", "128", "--intermediate", "256", "--heads", "4",
                 "--kv-heads", "2", "--vocab", "512", "--seq", "64"]  # fmt: skip


def test_70b_step_script_builds_from_config_alone_and_matches_the_planner(tmp_path, capsys):
    step = _load("qlora_70b_step")
    out = tmp_path / "step.json"
    model_dir = tmp_path / "model"
    step.main([*TINY_70B_ARGS, "--workdir", str(model_dir), "--json", str(out)])
    report = json.loads(out.read_text())
    # built via init="random" from config.json alone: no weights were ever written
    assert report["init"] == "random"
    assert report["model_dir_files"] == ["config.json"] == sorted(p.name for p in model_dir.iterdir())
    assert not list(model_dir.glob("*.safetensors"))
    # Llama parameter count by hand: embeddings + head, per layer q,o (h²), k,v (h·kv_dim), 3 MLP (h·i), 2 norms
    h, kv_dim, inter, vocab = 128, 2 * 128 // 4, 256, 512
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h
    assert report["n_params"] == 2 * vocab * h + 2 * per_layer + h
    adapters = 2 * 64 * (2 * (h + h) + 2 * (h + kv_dim) + 2 * (h + inter) + (inter + h))  # r=64 on 7 linears x 2
    assert report["trainable_params"] == adapters and report["adapter_dtype"] == "bfloat16"
    assert len(report["losses"]) == 3 and all(math.isfinite(x) for x in report["losses"])
    assert 4.0 < report["losses"][0] < 9.0  # about ln(512) = 6.2 for random weights on random tokens
    assert report["gc_forward_calls"] == [2, 2, 2] and report["train_mode"] and report["gradient_checkpointing"]
    assert report["optimizer"] == "AdamW32bit"  # paged needs CUDA: the strategy's unpaged fallback
    assert math.isfinite(report["tok_s"]) and report["tok_s"] > 0 and report["build_s"] > 0
    assert report["mfu"] is None and report["hfu"] is None  # no --peak-tflops on CPU
    # the live tensor peak (model + optimizer state + the step's tensors) against the planner's CPU prediction
    assert report["predicted_peak_gib"] > 0 and report["peak_kind"].startswith("live tensor bytes")
    assert 0.85 < report["measured_over_predicted"] < 1.15, report["measured_over_predicted"]
    assert report["peak_gib"] == pytest.approx(report["predicted_peak_gib"] * report["measured_over_predicted"])
    assert report["verdict"] == "PASS" and report["target_gib"] == 40.0
    assert report["device_used_gib"] is None  # CUDA only
    printed = capsys.readouterr().out
    assert "| target | peak <= 40 GiB: **PASS**" in printed and "predicted / measured" in printed


def test_70b_step_script_rejects_bad_dims_in_one_line(capsys):
    step = _load("qlora_70b_step")
    with pytest.raises(SystemExit):
        step.main([*TINY_70B_ARGS, "--hidden", "130"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--hidden 130 --heads 4" in err and "multiple of heads" in err


def test_gpu_check_dry_run_records_every_part_and_prints_the_summary(tmp_path):
    """bench/gpu_check.sh --dry-run: the GPU check's three parts on CPU with tiny sizes, one JSON each, a summary."""
    out = tmp_path / "out"
    script = BENCH.parent / "gpu_check.sh"
    env = dict(os.environ, PYTHON=sys.executable)  # the interpreter running the tests, whatever python3 is
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(script), "--dry-run", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600
    )
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-4000:]
    parts = {name: json.loads((out / f"{name}.json").read_text()) for name in ("1-qlora-7b", "2-packing", "3-70b-step")}
    qlora, packing, step = parts.values()
    assert qlora["status"] == "ok" and step["status"] == "ok", (qlora.get("log_tail"), step.get("log_tail"))
    assert packing["status"] == "ok" and packing["rc"] == 0, packing.get("log_tail")
    # part 2: ours padded and packed, and TRL's padding-free trainer (a test dependency) on the same rows
    assert {row["stack"] for row in packing["result"]["results"]} == {
        "ours padded", "ours packed", "TRL SFTTrainer padding_free"
    }  # fmt: skip
    assert packing["numbers"]["packed_over_padded"] > 0 and packing["numbers"]["packed_over_trl"] > 0
    # part 1: the three stacks' rows, and the ratios the summary prints
    rows = {row["stack"]: row for row in qlora["result"]["rows"]}
    assert list(rows) == [ANCHOR, OURS, "ours + compile_blocks"]
    for row in rows.values():
        assert row["workload"] == "micro 1x64" and (row["batch_size"], row["seq_len"], row["steps"]) == (1, 64, 2)
        assert len(row["step_times_ms"]) == len(row["losses"]) == 2 and row["tok_s"] > 0 and row["step_ms"] > 0
        assert row["peak_gib"] > 0 and row["peak_kind"] == "process peak RSS" and row["mfu"] is None
        assert row["train_mode"] and row["extra"]["gradient_checkpointing"] and row["optimizer"] == "AdamW32bit"
        assert row["extra"]["trainable_params"] == rows[ANCHOR]["extra"]["trainable_params"]
    # gradient checkpointing really recomputes: the first block's MLP is entered twice per step (eager stacks)
    assert rows[ANCHOR]["gc_forward_calls"] == rows[OURS]["gc_forward_calls"] == [2, 2]
    assert rows[OURS]["extra"]["fast_path"] == {
        "compiled_blocks": 0, "lora_layers": 14, "fused_lora_layers": 14, "loss": "chunked (4096 tokens)"
    }  # fmt: skip
    compiled = rows["ours + compile_blocks"]  # every block compiled (aot_eager: dynamo's capture), no graph break
    assert (
        compiled["extra"]["fast_path"]["compiled_blocks"] == 2
        and compiled["extra"]["fast_path"]["fused_lora_layers"] == 14
    )
    assert not any("broke the compiled graphs" in w for w in compiled["extra"]["warnings"]), compiled["extra"]
    assert all(math.isfinite(x) for x in compiled["losses"]) and compiled["ratio_tok_s"] > 0
    # Step 1 runs before any update and B starts at zero: both losses are the NF4+DQ base model's loss on the same
    # batch (weights drawn with std 0.08, so the loss depends on them); fp32 here, so they agree closely
    assert rows[OURS]["first_loss"] == pytest.approx(rows[ANCHOR]["first_loss"], rel=2**-8)
    assert 4.0 < rows[OURS]["first_loss"] < 12.0 and rows[OURS]["ratio_tok_s"] > 0 and rows[OURS]["ratio_peak"] > 0
    table = (out / "1-qlora-7b.log").read_text()
    assert "| workload | stack | step ms | tok/s | peak GiB | device-used GiB | MFU 4N | HFU 6N |" in table
    assert f"| micro 1x64 | {OURS} |" in table and f"{rows[OURS]['ratio_tok_s']:.2f}×" in table
    assert "no MLP call counter" in table  # the compiled stack's note: its checkpointing is read off the flags
    assert not qlora["result"]["partial"] and qlora["numbers"]["ours_over_anchor"] > 0
    assert qlora["numbers"]["compiled_over_anchor"] > 0
    assert step["numbers"]["verdict"] == "PASS" and step["result"]["init"] == "random"
    for record in (qlora, step):
        assert record["rc"] == 0 and record["seconds"] > 0 and (out / record["log"]).read_text().strip()
    # the summary: printed last, one line per part, and summary.json with the header's matmul probe
    summary = printed[printed.rindex("summary:") :]
    assert "| 1 qlora-7b | ok |" in summary and "| 3 70b-step | ok |" in summary and "| 2 packing |" in summary
    assert "ours/anchor" in summary and "compiled/anchor" in summary and "PASS" in summary
    assert "packed/padded" in summary and "packed/TRL padding_free" in summary
    assert "the hardware limit: bf16 matmul 256^3" in printed
    saved = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in saved["parts"]] == [1, 2, 3] and saved["header"]["matmul"]["size"] == 256
    # what the device brings back: at most 8 files, plain names
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files


def test_checkpoint_every_reaches_ours_lora_callback(bench, tmp_path, monkeypatch):
    """``--checkpoint-every 2``: ours' LoRA callback checkpoints one block in two (the anchor keeps every block)."""
    import lightning_qlora

    seen = []
    original = lightning_qlora.LoRA.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("checkpoint_every_n_layers"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(lightning_qlora.LoRA, "__init__", spy)
    (row,) = bench.run_bench(
        preset="micro", device="cpu", stacks=("ours",), isolate=False, workdir=tmp_path, steps=1, warmup=0,
        compute_dtype="fp32", log=lambda _: None, checkpoint_every_n_layers=2,
    )  # fmt: skip
    assert seen == [2] and row.extra["gradient_checkpointing"] and row.extra["checkpoint_every_n_layers"] == 2
