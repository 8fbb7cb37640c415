#!/usr/bin/env python
"""A real QLoRA training step of the Llama-2-70B architecture (80 layers) on one GPU, built straight into 4 bits.

No 140 GB checkpoint is needed: the script writes only ``config.json`` (``LlamaConfig(..., tie_word_embeddings=
False)``) and fits ``CausalLM(model=<config.json>, init="random")`` under ``lightning.Trainer(plugins=
[NF4Precision()], callbacks=[LoRA(r=64, alpha=16, dropout=0.05, gradient_checkpointing=True, dtype=<adapter>)],
strategy=PagedOptimizerStrategy("paged_adamw_32bit"))``: every linear is an empty 4-bit shell filled from a random
draw and quantized one layer at a time, so the bf16 model never exists. Then a few steps on random tokens (batch 1 x
2048 by default), and one table: build time and host peak RSS, step time, tok/s, MFU, ``max_memory_allocated``
beside the device-wide used memory, the planner's prediction (``lightning_qlora.memory.planner.plan_memory``) and
PASS/FAIL against the 40 GiB target. Only our stack: HF + peft + bitsandbytes cannot build a 70B model without a
checkpoint (its comparison stays on ``qlora_vs_hf.py --preset 70b-slice``).

Examples::

    python bench/qlora_70b_step.py --json bench-70b-step.json                # 80 layers on one 80 GB GPU
    python bench/qlora_70b_step.py --layers 8                                # a quick check
    python bench/qlora_70b_step.py --device cpu --layers 2 --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 \\
        --vocab 512 --seq 64                                                  # tiny dims, for testing on CPU

On CPU the peak is the live tensor bytes (model, optimizer state, and a ``LiveTensorTracker`` over each timed
step): what the caching allocator of a GPU would hold for the same ops. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from measure import GIB, MemoryProbe, device_name, mfu, peak_rss_bytes, versions  # noqa: E402
from ours import bench_trainer, build_and_step_probe_class  # noqa: E402
from workloads import LLAMA_2_70B, LORA, LR, llama_config, random_batches  # noqa: E402

from lightning_qlora.utils.atomic import atomic_write_text  # noqa: E402
from lightning_qlora.utils.dtypes import to_dtype  # noqa: E402


@dataclass
class StepReport:
    """Everything one run measured (sizes in GiB, times in ms unless named otherwise)."""

    arch: dict[str, Any]
    """The Llama config fields written to ``config.json``."""
    n_params: int
    """All base-model parameters (the N of MFU), counted on the meta model by the planner."""
    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    """Leading steps left out of the median step time."""
    device: str
    adapter_dtype: str
    init: str
    """``CausalLM``'s ``init`` hyper-parameter: ``random`` (built from the config alone)."""
    model_dir_files: list[str]
    """What the model folder held: ``config.json`` only (no weights were ever written)."""
    build_s: float
    """Seconds of ``CausalLM.configure_model``: every linear drawn and quantized, layer by layer."""
    setup_s: float
    """Seconds from Trainer setup to the first step: build, LoRA injection, optimizer."""
    host_rss_before_build_gib: float
    host_peak_rss_build_gib: float
    """The process's peak resident set at the end of the build (imports included)."""
    build_peak_gib: float | None
    """CUDA ``max_memory_allocated`` at the end of the build (the 4-bit model plus one layer being drawn)."""
    model_gib: float
    """The built model as stored: 4-bit codes and constants, embeddings, norms, head, adapters."""
    step_ms: float
    """Median over the steps after the warmup of one synchronised step (forward, backward, optimizer, zero_grad)."""
    step_times_ms: list[float]
    tok_s: float
    mfu: float | None
    """4·N FLOPs per token over the peak: forward + input-gradient backward (the base is frozen)."""
    hfu: float | None
    """6·N FLOPs per token over the peak: plus the forward that activation checkpointing recomputes."""
    peak_tflops: float | None
    peak_gib: float
    """CUDA: ``torch.cuda.max_memory_allocated`` over the whole run (build included). CPU: live tensor bytes."""
    peak_kind: str
    device_used_gib: float | None
    """CUDA: max of ``total - free`` (``torch.cuda.mem_get_info``) sampled after the build and each step."""
    device_used_before_gib: float | None
    """CUDA: ``total - free`` before the build (CUDA context, other processes)."""
    reserved_peak_gib: float | None
    """CUDA: ``torch.cuda.max_memory_reserved`` (the caching allocator's segments)."""
    predicted_peak_gib: float
    """The planner's peak (what ``max_memory_allocated`` should report)."""
    predicted_total_gib: float
    """The planner's peak plus the paged optimizer state (device-wide when nothing is paged out)."""
    measured_over_predicted: float
    target_gib: float
    verdict: str
    """``PASS`` when the measured peak is at most ``target_gib``, else ``FAIL``."""
    losses: list[float]
    optimizer: str
    trainable_params: int
    gc_forward_calls: list[int]
    """Calls into the first decoder layer's MLP per step: 2 = gradient checkpointing recomputed it."""
    train_mode: bool
    gradient_checkpointing: bool
    fast_path: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    host_peak_rss_gib: float = 0.0
    """The process's peak resident set over the whole run."""


def run_step(
    arch: dict[str, Any],
    device: str = "cuda",
    batch_size: int = 1,
    seq_len: int = 2048,
    steps: int = 3,
    warmup: int = 1,
    adapter_dtype: str = "bf16",
    peak_tflops: float | None = None,
    target_gib: float = 40.0,
    init_std: float | None = None,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    cpu_max_gib: float = 8.0,
) -> tuple[StepReport, Any]:
    """Write ``config.json``, build ``CausalLM(init="random")`` in 4 bits, fit ``steps`` steps; return (report, plan).

    Args:
        arch: ``LlamaConfig`` fields (``LLAMA_2_70B`` with overrides).
        device: ``cuda`` or ``cpu``.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        steps: training steps, warmup included.
        warmup: leading steps left out of the median step time.
        adapter_dtype: LoRA master-weight dtype (``bf16`` or ``fp32``).
        peak_tflops: peak dense bf16 TFLOP/s for MFU (None: n/a).
        target_gib: the peak that PASSes.
        init_std: std of the random linears (None: the config's ``initializer_range``).
        seed: seed of the weights and the tokens.
        workdir: where ``config.json`` goes (None: a temp dir, removed afterwards).
        cpu_max_gib: on CPU, refuse a model whose planned memory is larger than this.

    Raises:
        SystemExit: for ``device="cuda"`` without a visible GPU, or a CPU run planned over ``cpu_max_gib``.
    """
    from torch.utils.data import DataLoader

    from lightning_qlora import LoRA
    from lightning_qlora.lora.layer import LoRAConfig
    from lightning_qlora.memory.planner import plan_memory
    from lightning_qlora.models.causal_lm import CausalLM

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; pass --device cpu with tiny dims to test")
    own_dir = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="qlora_70b_")) if own_dir else Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.json"
    llama_config(arch).to_json_file(str(config_path))  # the only file: no weights are ever written
    lora = dict(LORA, gradient_checkpointing=True, dtype=adapter_dtype)
    plan = plan_memory(
        str(config_path), batch_size, seq_len, lora=LoRAConfig(r=lora["r"], alpha=lora["alpha"],
        dropout=lora["dropout"], dtype=adapter_dtype), optimizer="paged_adamw_32bit", gradient_checkpointing=True,
        loss_chunk_size=4096, device_type=device,
    )  # fmt: skip
    if device == "cpu" and plan.total > cpu_max_gib * GIB:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)
        raise SystemExit(
            f"--device cpu: this model plans {plan.total / GIB:.1f} GiB (over --cpu-max-gib {cpu_max_gib:g}); pass "
            "tiny dims (--layers 2 --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 --vocab 512) or --device cuda"
        )
    probe = MemoryProbe(device)
    probe.reset()
    timer = build_and_step_probe_class()(device, probe, warmup)
    root = tempfile.mkdtemp(prefix="qlora_70b_trainer_")
    try:
        torch.manual_seed(seed)
        # the timer first: it times the build inside LoRA's wrapper
        trainer = bench_trainer(device, [timer, LoRA(**lora)], steps, root)
        module = CausalLM(model=str(config_path), dtype="bf16", init="random", init_std=init_std, lr=LR,
                          weight_decay=0.01)  # fmt: skip
        batches = random_batches(steps, batch_size, seq_len, arch["vocab_size"], seed)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
        files = sorted(p.name for p in folder.iterdir())
        optimizer = ", ".join(type(o).__name__ for o in trainer.optimizers)
        init = module.hparams["init"]
    finally:
        if timer._tracker is not None:  # a step that raised: take the tracker off torch's mode stack
            timer._tracker.__exit__(None, None, None)
            timer._tracker = None
        shutil.rmtree(root, ignore_errors=True)
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)
    n = plan.settings["params"]
    step = statistics.median(timer.times[warmup:] or timer.times)
    tok_s = batch_size * seq_len / step
    cuda = device == "cuda"
    if cuda:
        probe.sample()
        peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        peak, kind = timer.live_peak, "live tensor bytes (CPU stand-in for max_memory_allocated)"
    report = StepReport(
        arch=arch, n_params=n, batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup, device=device,
        adapter_dtype=str(LoRAConfig(dtype=adapter_dtype).dtype), init=init, model_dir_files=files,
        build_s=timer.build_s, setup_s=timer.setup_s, host_rss_before_build_gib=timer.rss_before / GIB,
        host_peak_rss_build_gib=timer.rss_peak_build / GIB,
        build_peak_gib=timer.build_peak / GIB if timer.build_peak is not None else None,
        model_gib=timer.model_bytes / GIB, step_ms=step * 1e3, step_times_ms=[t * 1e3 for t in timer.times],
        tok_s=tok_s, mfu=mfu(n, tok_s, peak_tflops, 4), hfu=mfu(n, tok_s, peak_tflops, 6),
        peak_tflops=peak_tflops, peak_gib=peak / GIB, peak_kind=kind,
        device_used_gib=probe.used_max / GIB if cuda else None,
        device_used_before_gib=probe.used_before / GIB if cuda else None,
        reserved_peak_gib=torch.cuda.max_memory_reserved() / GIB if cuda else None,
        predicted_peak_gib=plan.peak / GIB, predicted_total_gib=plan.total / GIB,
        measured_over_predicted=peak / plan.peak if plan.peak else float("nan"), target_gib=target_gib,
        verdict="PASS" if peak / GIB <= target_gib else "FAIL", losses=timer.losses, optimizer=optimizer,
        trainable_params=timer.trainable, gc_forward_calls=timer.calls, train_mode=timer.train_mode,
        gradient_checkpointing=timer.gradient_checkpointing, fast_path=timer.fast_path,
        plan=json.loads(json.dumps(plan.as_dict(), default=str)),
        host_peak_rss_gib=(timer.rss_peak_train or peak_rss_bytes()) / GIB,
    )  # fmt: skip
    return report, plan


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _gib(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f} GiB" if value >= 1 else f"{value * 1024:.1f} MiB"


def _secs(value: float) -> str:
    return f"{value:.1f} s" if value >= 1 else f"{value * 1e3:.0f} ms"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_table(r: StepReport) -> str:
    """A two-column markdown table of one run."""
    a = r.arch
    cuda = r.device == "cuda"
    rows = [
        ("model", f"random-weight Llama, {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, MLP "
         f"{a['intermediate_size']}, heads {a['num_attention_heads']} (kv {a['num_key_value_heads']}), vocab "
         f"{a['vocab_size']}: {_count(r.n_params)} params"),
        ("built from", f"{', '.join(r.model_dir_files)} only, CausalLM(init={r.init!r}), each linear drawn and "
         "quantized to NF4+DQ layer by layer"),
        ("build time", f"{_secs(r.build_s)} (setup to first step {_secs(r.setup_s)}: LoRA, optimizer included)"),
        ("host peak RSS during build", f"{_gib(r.host_peak_rss_build_gib)} "
         f"(before build {_gib(r.host_rss_before_build_gib)})"),
        ("model as stored", f"{_gib(r.model_gib)} (4-bit base, embeddings, norms, head, {r.adapter_dtype} adapters)"),
        ("step", f"{r.step_ms:,.1f} ms (median of steps {r.warmup + 1}..{r.steps}), "
         f"batch {r.batch_size} x {r.seq_len}"),
        ("tok/s", f"{r.tok_s:,.1f}"),
        ("MFU 4N / HFU 6N", f"{_pct(r.mfu)} / {_pct(r.hfu)}"
         + (f" of {r.peak_tflops:g} TFLOP/s" if r.peak_tflops else " (pass --peak-tflops)")),
        ("peak memory", f"{_gib(r.peak_gib)}: {r.peak_kind}"),
        ("device-wide used (total - free)", f"{_gib(r.device_used_gib)}"
         + (f" (before build {_gib(r.device_used_before_gib)}; allocator cache, CUDA context and paged optimizer "
            f"state included; reserved peak {_gib(r.reserved_peak_gib)})" if cuda else " (CUDA only)")),
        ("planner predicted peak", f"{_gib(r.predicted_peak_gib)} (with paged states {_gib(r.predicted_total_gib)})"),
        ("measured / predicted", f"{r.measured_over_predicted:.3f}"),
        ("target", f"peak <= {r.target_gib:g} GiB: **{r.verdict}**"
         + ("" if cuda else " (CPU live tensor bytes, not a GPU measurement)")),
        ("losses", ", ".join(f"{x:.4f}" for x in r.losses)),
        ("setup", f"{r.optimizer}, {r.trainable_params / 1e6:.1f}M trainable, checkpointing "
         f"{'on' if r.gradient_checkpointing else 'OFF'} (first MLP entered {r.gc_forward_calls} per step), "
         f"fused LoRA {r.fast_path.get('fused_lora_layers')}/{r.fast_path.get('lora_layers')}, "
         f"loss {r.fast_path.get('loss')}"),
    ]  # fmt: skip
    return "\n".join(["| quantity | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> StepReport:
    """Parse the command line, run the step, print the header, table and the planner's breakdown; write --json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--layers", type=int, default=LLAMA_2_70B["num_hidden_layers"], help="decoder layers (80)")
    p.add_argument("--hidden", type=int, default=LLAMA_2_70B["hidden_size"], help="hidden size (8192)")
    p.add_argument("--intermediate", type=int, default=LLAMA_2_70B["intermediate_size"], help="MLP size (28672)")
    p.add_argument("--heads", type=int, default=LLAMA_2_70B["num_attention_heads"], help="attention heads (64)")
    p.add_argument("--kv-heads", type=int, default=LLAMA_2_70B["num_key_value_heads"], help="key/value heads (8)")
    p.add_argument("--vocab", type=int, default=LLAMA_2_70B["vocab_size"], help="vocabulary (32000)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (1)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (2048)")
    p.add_argument("--steps", type=int, default=3, help="training steps, warmup included (3)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median (1)")
    p.add_argument("--adapter-dtype", default="bf16", help="LoRA master-weight dtype: bf16 (default) or fp32")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default 989 on CUDA)")
    p.add_argument("--target-gib", type=float, default=40.0, help="PASS when the peak is at most this (40)")
    p.add_argument("--init-std", type=float, help="std of the random linears (default the config's 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--workdir", help="where config.json goes (default: a temp dir, removed afterwards)")
    p.add_argument("--cpu-max-gib", type=float, default=8.0, help="CPU: refuse models planned over this (8)")
    p.add_argument("--json", help="write the report (and versions, device, command, plan) to this file")
    args = p.parse_args(argv)
    positive = {"--layers": args.layers, "--hidden": args.hidden, "--intermediate": args.intermediate,
                "--heads": args.heads, "--kv-heads": args.kv_heads, "--vocab": args.vocab, "--batch": args.batch,
                "--seq": args.seq, "--steps": args.steps}  # fmt: skip
    bad = [f"{k} {v}" for k, v in positive.items() if v < 1]
    if bad:
        p.error(f"got {', '.join(bad)}; these must be >= 1")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"got --hidden {args.hidden} --heads {args.heads} --kv-heads {args.kv_heads}; hidden must be a "
                "multiple of heads and heads a multiple of kv-heads")  # fmt: skip
    if not 0 <= args.warmup < args.steps:
        p.error(f"got --warmup {args.warmup} with --steps {args.steps}; need 0 <= warmup < steps")
    try:
        to_dtype(args.adapter_dtype)
    except ValueError:
        p.error(f"got --adapter-dtype {args.adapter_dtype!r}; use bf16 (default) or fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else (989.0 if args.device == "cuda" else None)
    arch = dict(LLAMA_2_70B, num_hidden_layers=args.layers, hidden_size=args.hidden,
                intermediate_size=args.intermediate, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                vocab_size=args.vocab, max_position_embeddings=max(4096, args.seq))  # fmt: skip
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    info = versions(("transformers", "bitsandbytes", "lightning"))
    header = [
        f"command: {command}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"device: {device_name(args.device)}",
        f"workload: NF4 + double quant, bf16 compute/autocast; LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"dropout={LORA['dropout']} ({args.adapter_dtype}) on all linear layers but lm_head; gradient checkpointing; "
        f"paged_adamw_32bit lr {LR:g}; chunked loss; random tokens, labels = input_ids",
    ]
    print("\n".join(header), flush=True)
    report, plan = run_step(
        arch, device=args.device, batch_size=args.batch, seq_len=args.seq, steps=args.steps, warmup=args.warmup,
        adapter_dtype=args.adapter_dtype, peak_tflops=peak_tflops, target_gib=args.target_gib,
        init_std=args.init_std, seed=args.seed, workdir=args.workdir, cpu_max_gib=args.cpu_max_gib,
    )  # fmt: skip
    breakdown = plan.format_table(measured_peak=round(report.peak_gib * GIB))
    print("\n" + format_table(report) + "\n\nplanner breakdown:\n" + breakdown, flush=True)
    if args.json:
        payload = {"command": command, "versions": info, "device": device_name(args.device), **asdict(report)}
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
