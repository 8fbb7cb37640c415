#!/usr/bin/env python
"""lightning_qlora vs the anchor (HF transformers + peft + bitsandbytes) on the same QLoRA training workload.

One command builds a random-weight Llama once (``save_pretrained`` -> safetensors in a temp dir) and runs the same
workload through both stacks:

* ours: ``lightning.Trainer(plugins=[NF4Precision()], callbacks=[LoRA(...), StepTimer()],
  strategy=PagedOptimizerStrategy("paged_adamw_32bit"))`` fitting ``CausalLM(model=<dir>)``, which loads through
  lightning_qlora's quantize-on-load path;
* anchor: exactly ``/work/shared/reference/anchor_hf_peft_bnb.py``: ``from_pretrained`` with ``BitsAndBytesConfig``
  (NF4 + double quant, bf16 compute), ``prepare_model_for_kbit_training`` with gradient checkpointing, peft LoRA on
  all linear layers, ``model.train()``, bitsandbytes ``PagedAdamW32bit`` at lr 2e-4 (``AdamW32bit`` on CPU, where
  paging does not exist, as our strategy falls back too), bf16 autocast, a plain loop;
* ours-compiled (``--stacks anchor,ours,ours-compiled``): ours with ``LoRA(compile_blocks=True)``, each decoder layer
  compiled by ``torch.compile`` (the compile falls in the warmup steps).

Both: LoRA r=64, alpha=16, dropout=0.05 on every linear layer but the head; labels = input_ids; the same random
token batches; each step timed with synchronisation; median over the steps after the warmup.

Examples::

    python bench/qlora_vs_hf.py --device cpu --preset tiny
    python bench/qlora_vs_hf.py --device cuda --preset 7b --json bench-7b.json
    python bench/qlora_vs_hf.py --device cuda --preset 70b-slice --layers 4 8 --json bench-70b.json

See bench/README.md for what every number means.

The code lives in modules beside this script: workloads.py (presets, batches, the random checkpoint), measure.py
(memory probes, MFU, the ``Row``), anchor.py and ours.py (the two stacks), runner.py (isolation, ``run_bench``);
this file is the command line, the table and its notes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import asdict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from measure import (  # noqa: E402, F401  (re-exported: tests and notebooks use them from here)
    GIB,
    MemoryProbe,
    Row,
    cpu_busy_note,
    device_name,
    summarize,
    versions,
)
from runner import STACKS, _child, run_bench, run_stack  # noqa: E402, F401
from workloads import LORA, LR, PRESETS, Workload, build_model_dir, make_batches, parse_shapes  # noqa: E402, F401

from lightning_qlora.utils.atomic import atomic_write_text  # noqa: E402


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def format_table(rows: list[Row]) -> str:
    """A markdown table: one line per (workload, stack)."""
    head = (
        "| workload | stack | step ms | tok/s | peak GiB | device-used GiB | MFU 4N | HFU 6N | tok/s ours/anchor | "
        "peak ours/anchor | step-1 loss |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.stack} | {r.step_ms:,.1f} | {r.tok_s:,.0f} | {r.peak_gib:.2f} | "
            f"{_fmt(r.device_used_gib, '.2f')} | {_fmt(None if r.mfu is None else r.mfu * 100, '.1f', '%')} | "
            f"{_fmt(None if r.hfu is None else r.hfu * 100, '.1f', '%')} | "
            f"{_fmt(r.ratio_tok_s, '.2f', '×')} | {_fmt(r.ratio_peak, '.2f', '×')} | {r.first_loss:.4f} |"
        )
    return "\n".join(lines)


def notes(rows: list[Row], device: str, preset: str, peak_tflops: float | None) -> list[str]:
    """The lines under the table: what each column is, fast paths taken, warnings, the 70B extrapolation."""
    out = []
    if rows:
        r = rows[0]
        out.append(
            f"step ms = median of steps {r.warmup + 1}..{r.steps} (the first {r.warmup} are warmup); "
            "one step = forward + backward + optimizer step + zero_grad, synchronised; tok/s = batch·seq / step"
        )
        out.append(
            f"peak GiB = {r.peak_kind}"
            + (
                (" of a fresh process per stack" + (" (imports included)" if device == "cpu" else ""))
                if r.isolated
                else (" (reset before each stack)" if device == "cuda" else " (NOT isolated: includes earlier runs)")
            )
            + (
                "; device-used GiB = max of (total - free) from torch.cuda.mem_get_info sampled after load and "
                "after each step: allocator cache, CUDA context and paged optimizer state included"
                if device == "cuda"
                else "; device-used: n/a on CPU"
            )
        )
    out.append(
        f"MFU 4N = 4·N·tok/s / {peak_tflops:g} TFLOP/s, N = all parameters of the base model: forward + "
        "input-gradient backward over the frozen base (the anchor log's 4·N·T); HFU 6N = 6·N·tok/s / peak: plus "
        "the forward that gradient checkpointing recomputes"
        if peak_tflops
        else "MFU n/a (pass --peak-tflops)"
    )
    for r in rows:
        if r.extra.get("fast_path", {}).get("compiled_blocks"):
            out.append(
                f"{r.workload} {r.stack}: no MLP call counter there (a Python hook inside a compiled block is a "
                "graph break that would make the block run eager); checkpointing is checked on the model's flags"
            )
        elif r.gc_forward_calls and any(c != 2 for c in r.gc_forward_calls):
            out.append(
                f"WARNING {r.stack} on {r.workload}: first layer's MLP ran {r.gc_forward_calls} times per step "
                "(2 = checkpointing recomputes it)"
            )
        if not r.train_mode:
            out.append(f"WARNING {r.stack} on {r.workload}: model was not in train mode")
        if "repeat_step_ms" in r.extra:
            runs = ", ".join(f"{x:,.1f}" for x in r.extra["repeat_step_ms"])
            out.append(
                f"{r.workload} {r.stack}: {len(r.extra['repeat_step_ms'])} runs, step ms {runs}; median run shown"
            )
        if r.extra.get("fast_path"):
            fast = r.extra["fast_path"]
            backend = r.extra.get("compile_backend")
            out.append(
                f"{r.workload} {r.stack}: fused LoRA on {fast['fused_lora_layers']}/{fast['lora_layers']} adapted "
                f"layers; loss: {fast['loss']}; compiled blocks: {fast.get('compiled_blocks', 0)}"
                + (f" (torch.compile backend {backend})" if backend and backend != "inductor" else "")
            )
        if "loop_step_ms" in r.extra:
            out.append(
                f"{r.workload} {r.stack}: {r.extra['loop_step_ms']:,.1f} ms/step end to end through Lightning's loop "
                f"(batch fetch and hooks between batches included) = {r.extra['loop_tok_s']:,.0f} tok/s"
            )
    spec = PRESETS[preset]
    if "full_layers" in spec:
        for stack in sorted({r.stack for r in rows}):
            mine = sorted({(r.layers, r.peak_gib) for r in rows if r.stack == stack})
            if len(mine) >= 2 and mine[-1][0] != mine[0][0]:
                (l0, p0), (l1, p1) = mine[0], mine[-1]
                slope = (p1 - p0) / (l1 - l0)
                full = p0 + slope * (spec["full_layers"] - l0)
                out.append(
                    f"{stack}: peak grows {slope:.2f} GiB/layer ({l0}L {p0:.2f} -> {l1}L {p1:.2f} GiB); linear "
                    f"extrapolation to {spec['full_layers']} layers: {full:.1f} GiB"
                )
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse the command line, run the comparison, print the header, table and notes; write --json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layers (one model per value), e.g. 4 8")
    parser.add_argument("--shapes", type=parse_shapes, help="batch x seq list, e.g. 4x1024,1x4096")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="steps left out of the median (default 2)")
    parser.add_argument(
        "--stacks",
        default="anchor,ours",
        help="comma list of anchor, ours, ours-compiled (LoRA(compile_blocks=True)); default anchor,ours",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default 989 on CUDA = H100 SXM; CPU n/a)"
    )
    iso = parser.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None, help="each stack in a subprocess")
    iso.add_argument("--in-process", dest="isolate", action="store_false", help="both stacks in this process")
    parser.add_argument("--init-std", type=float, help="draw every weight matrix from N(0, std) (default HF init)")
    parser.add_argument("--workdir", help="where the random checkpoints go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default: torch's)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per stack, alternating; the median-tok/s run is reported"
    )
    parser.add_argument(
        "--lora-dropout", type=float, default=LORA["dropout"], help="adapter dropout, both stacks (default 0.05)"
    )
    parser.add_argument(
        "--compute-dtype", choices=["bf16", "fp32"], default="bf16",
        help="both stacks' compute dtype (default bf16, the anchor script's; fp32 where a CPU only emulates bf16)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-backend", choices=["inductor", "aot_eager", "eager"], default="inductor",
        help="ours-compiled: torch.compile backend (default inductor; aot_eager = graph capture, no code generation)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-mode",
        choices=["full", "selective", "none"],
        default="full",
        help="ours' activation checkpointing: full (as the anchor) or selective (keeps attention outputs); none: "
        "no checkpointing in either stack",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=1, metavar="N",
        help="ours checkpoints one decoder block in N (fewer recomputes, more memory; the anchor: every block)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the random checkpoints in --workdir and reuse them in later runs (same preset, layers, seed, init)",
    )
    parser.add_argument(
        "--json", help="write the rows (and versions, device, command) to this file; rewritten after each run"
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        _child(args._child)
        return []
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if args.device == "cuda" else None)
    stacks = tuple(s.strip() for s in args.stacks.split(",") if s.strip())
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        parser.error(f"unknown stacks {unknown}; use anchor, ours, ours-compiled")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    info = versions()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device_name(args.device)
    arch = dict(PRESETS[args.preset]["arch"])
    layer_counts = args.layers or PRESETS[args.preset].get("layers") or [arch.pop("num_hidden_layers")]
    arch.pop("num_hidden_layers", None)
    header = [
        f"command: {command}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"device: {dev}",
        f"model: random-weight Llama ({args.preset}), layers {' and '.join(map(str, layer_counts))}, "
        + ", ".join(f"{k.removeprefix('num_')} {v}" for k, v in arch.items())
        + (f", init N(0, {args.init_std})" if args.init_std else ""),
        f"workload: NF4 + double quant, {args.compute_dtype} compute; LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"dropout={args.lora_dropout} on all linear layers but lm_head; "
        + (
            "no gradient checkpointing; "
            if args.checkpoint_mode == "none"
            else f"gradient checkpointing (ours: {args.checkpoint_mode}"
            + (f", one block in {args.checkpoint_every}" if args.checkpoint_every > 1 else "")
            + "); "
        )
        + f"{'PagedAdamW32bit' if args.device == 'cuda' else 'AdamW32bit (paged needs CUDA)'} lr {LR:g}; "
        "labels = input_ids",
    ]
    print("\n".join(header), flush=True)
    finished: list[Row] = []

    def save(rows: list[Row], notes_lines: list[str] | None) -> None:  # None: partial (more rows to come)
        payload = {
            "command": command,
            "versions": info,
            "device": dev,
            "preset": args.preset,
            "peak_tflops": peak,
            "partial": notes_lines is None,
            "rows": [asdict(r) for r in rows],
            "notes": notes_lines or [],
        }
        atomic_write_text(args.json, json.dumps(payload, indent=2))

    def on_row(row: Row) -> None:  # the rows so far, in case the command is cut off before the table
        finished.append(row)
        save(finished, None)

    rows = run_bench(
        preset=args.preset,
        device=args.device,
        stacks=stacks,
        layers=args.layers,
        shapes=args.shapes,
        steps=args.steps,
        warmup=args.warmup,
        peak_tflops=peak,
        isolate=args.isolate,
        init_std=args.init_std,
        workdir=args.workdir,
        seed=args.seed,
        threads=args.threads,
        repeat=max(1, args.repeat),
        lora_dropout=args.lora_dropout,
        checkpoint_mode=args.checkpoint_mode,
        checkpoint_every_n_layers=args.checkpoint_every,
        compute_dtype=args.compute_dtype,
        compile_backend=args.compile_backend,
        keep_models=args.keep_models,
        log=lambda s: print(f"  .. {s}", flush=True),
        on_row=on_row if args.json else None,
    )
    table = format_table(rows)
    lines = notes(rows, args.device, args.preset, peak)
    if args.device == "cpu":
        busy = [r.extra.get("busy_cores_before") for r in rows]
        known = [b for b in busy if b is not None]
        warning = cpu_busy_note(torch.get_num_threads(), max(known) if known else None)
        lines += [warning] if warning else []
    print("\n" + "\n".join(header) + "\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in lines), flush=True)
    if args.json:
        save(rows, lines)
    return rows


if __name__ == "__main__":
    main()
