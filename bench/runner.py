#!/usr/bin/env python
"""Running the stacks: each on each workload, in this process or in a fresh one, and the whole comparison.

``run_bench`` builds each random checkpoint once and runs every stack on every batch shape. On CPU each stack runs
in a fresh process (``python bench/runner.py --_child SPEC``), since a process's peak RSS cannot be reset.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from anchor import run_anchor  # noqa: E402
from measure import GIB, Row, busy_cores, merge_repeats, rss_now_bytes  # noqa: E402
from ours import run_ours, run_ours_compiled  # noqa: E402
from workloads import Workload, build_model_dir, workloads_for  # noqa: E402

STACKS = {"anchor": run_anchor, "ours": run_ours, "ours-compiled": run_ours_compiled}


def run_stack(stack: str, w: Workload, peak_tflops: float | None, isolated: bool) -> Row:
    """Run one stack on one workload in this process, recording the warnings it raised."""
    if w.threads:
        torch.set_num_threads(w.threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        row = STACKS[stack](w, peak_tflops, isolated)
    seen: dict[str, None] = {}
    for item in caught:
        seen.setdefault(f"{item.category.__name__}: {str(item.message).splitlines()[0][:200]}", None)
    row.extra["warnings"] = list(seen)
    return row


def run_stack_in_subprocess(stack: str, w: Workload, peak_tflops: float | None) -> Row:
    """Run one stack in a fresh ``python runner.py`` process (process peak RSS and CUDA memory start from zero)."""
    with tempfile.TemporaryDirectory(prefix="qlora_bench_child_") as tmp:
        out = Path(tmp) / "row.json"
        spec = {"stack": stack, "workload": asdict(w), "peak_tflops": peak_tflops, "out": str(out)}
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"{stack} on {w.name} failed (exit {proc.returncode}):\n{tail}")
        return Row(**json.loads(out.read_text()))


def _child(spec_json: str) -> None:
    """Child-process entry: run the stack that ``spec_json`` names and write its ``Row`` as JSON."""
    spec = json.loads(spec_json)
    # the same imports in every child, so both processes start from the same resident set
    import bitsandbytes  # noqa: F401
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lightning_qlora  # noqa: F401

    baseline = rss_now_bytes()
    row = run_stack(spec["stack"], Workload(**spec["workload"]), spec["peak_tflops"], isolated=True)
    row.extra["rss_after_imports_gib"] = baseline / GIB
    Path(spec["out"]).write_text(json.dumps(asdict(row)))


def run_bench(
    preset: str = "tiny",
    device: str = "cpu",
    stacks: tuple[str, ...] = ("anchor", "ours"),
    layers: list[int] | None = None,
    shapes: list[tuple[int, int]] | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    peak_tflops: float | None = None,
    isolate: bool | None = None,
    init_std: float | None = None,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    keep_models: bool = False,
    repeat: int = 1,
    lora_dropout: float = 0.05,
    checkpoint_mode: str = "full",
    checkpoint_every_n_layers: int = 1,
    compute_dtype: str = "bf16",
    compile_backend: str = "inductor",
    log: Any = print,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Build each model once, run every stack on every batch shape, and return the rows (with ours/anchor ratios).

    Args:
        preset: ``micro``, ``tiny``, ``7b`` or ``70b-slice``.
        device: ``cpu`` or ``cuda``.
        stacks: which of ``anchor``/``ours``/``ours-compiled`` to run, in that order.
        layers: decoder-layer counts (one model each); default the preset's.
        shapes: ``(batch, seq)`` pairs; default the preset's.
        steps: training steps per run (timed); default the preset's.
        warmup: leading steps left out of the median (default 2, or steps - 1 when fewer).
        peak_tflops: the device's peak dense bf16 TFLOP/s for MFU (None: MFU n/a).
        isolate: run each stack in a fresh subprocess (default on; a process's peak RSS cannot be reset, nor can
            bitsandbytes' paged optimizer state be freed).
        init_std: re-draw every matrix from N(0, init_std) (default: transformers' init, std 0.02).
        workdir: where the random checkpoints go (default a temp dir, removed afterwards).
        seed: seed of the weights and of the token batches.
        threads: torch CPU threads in every run (default torch's; 1 is steadier on a busy machine).
        repeat: run each stack this many times, alternating, and keep the run with the median tok/s (peaks: max).
        lora_dropout: adapter dropout of both stacks.
        checkpoint_mode: ours' activation checkpointing, ``full`` (as the anchor's) or ``selective``; ``none``
            turns checkpointing off in both stacks.
        checkpoint_every_n_layers: ours checkpoints one block in this many (the anchor every block).
        compute_dtype: both stacks' compute dtype, ``bf16`` (the anchor script's) or ``fp32`` (fast on CPUs that
            only emulate bf16).
        compile_backend: ``ours-compiled``'s ``torch.compile`` backend (``inductor``; ``aot_eager`` captures the
            graphs without generating code: a quick check on CPU, where Inductor's C++ compile takes a minute).
        keep_models: leave the random checkpoints in ``workdir`` (``<preset>-<layers>L``) instead of deleting them,
            and reuse one a previous run left there with the same architecture, seed and init.
        log: progress printer.
        on_row: called with each stack's ``Row`` as soon as that run ends (before the ratios are filled in), e.g.
            to save the rows so far where the whole command might be cut off.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    # a fresh process per stack on CUDA too: bitsandbytes never frees paged optimizer state (managed memory) within a
    # process, so device-wide used memory would carry every earlier run's states into the later stacks' figures
    isolate = True if isolate is None else isolate
    build_device = "cpu" if isolate else device  # keep this parent process off the GPU while the children measure
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="qlora_bench_")) if own_dir else Path(workdir)
    base.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        for arch, cells in workloads_for(preset, device, base, layers, shapes, steps, warmup, init_std, seed, threads):
            init = arch.pop("_init_std")
            model_dir = Path(cells[0].model_dir)
            recipe = {"arch": arch, "seed": seed, "init_std": init, "draw": "meta+normal"}
            marker = model_dir / "bench_model.json"  # written last: a killed build is never reused
            kept = json.loads(marker.read_text()) if keep_models and marker.is_file() else None
            if kept is not None and kept["recipe"] == recipe:
                n = kept["n_params"]
                log(f"reusing the {arch['num_hidden_layers']}-layer model in {model_dir} ({n / 1e9:.3f}B params)")
            else:
                t = time.perf_counter()
                marker.unlink(missing_ok=True)
                n = build_model_dir(arch, model_dir, build_device, seed=seed, init_std=init)
                marker.write_text(json.dumps({"recipe": recipe, "n_params": n}))
                took = time.perf_counter() - t
                log(f"built {arch['num_hidden_layers']}-layer model ({n / 1e9:.3f}B params) in {took:.0f} s")
            for w in cells:
                w.n_params = n
                w.lora_dropout = lora_dropout
                w.checkpoint_mode = checkpoint_mode
                w.checkpoint_every_n_layers = checkpoint_every_n_layers
                w.compute_dtype = compute_dtype
                w.compile_backend = compile_backend
                runs: dict[str, list[Row]] = {}
                for _ in range(repeat):  # stacks alternate, so a burst of load elsewhere hits both
                    for stack in stacks:
                        busy = busy_cores() if device == "cpu" else None
                        t = time.perf_counter()
                        try:
                            if isolate:
                                row = run_stack_in_subprocess(stack, w, peak_tflops)
                            else:
                                row = run_stack(stack, w, peak_tflops, isolated=False)
                        except Exception as err:  # one failing cell (e.g. OOM) must not lose the others
                            log(f"FAILED {stack} on {w.name}: {type(err).__name__}: {str(err)[-1500:]}")
                            gc.collect()
                            if device == "cuda":
                                torch.cuda.empty_cache()
                            continue
                        took = time.perf_counter() - t
                        log(f"{w.name} {stack}: {row.tok_s:,.0f} tok/s ({took:.0f} s incl. loading)")
                        row.extra["busy_cores_before"] = busy
                        runs.setdefault(stack, []).append(row)
                        if on_row is not None:
                            on_row(row)
                by_stack = {stack: merge_repeats(found) for stack, found in runs.items()}
                rows.extend(by_stack[stack] for stack in stacks if stack in by_stack)
                anchor = by_stack.get("anchor")
                for stack, ours in by_stack.items():
                    if anchor is None or stack == "anchor":
                        continue
                    ours.ratio_tok_s = ours.tok_s / anchor.tok_s
                    ours.ratio_peak = ours.peak_gib / anchor.peak_gib
                    if ours.device_used_gib and anchor.device_used_gib:
                        ours.extra["ratio_device_used"] = ours.device_used_gib / anchor.device_used_gib
            if not keep_models:
                shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--_child":
        raise SystemExit("usage: python bench/runner.py --_child SPEC_JSON (internal; run bench/qlora_vs_hf.py)")
    _child(sys.argv[2])
