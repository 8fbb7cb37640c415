"""Why is ``compile_blocks`` slower than eager on a GPU? Time and profile a few 4-bit LoRA decoder layers both ways.

    python bench/compile_probe.py --device cuda                      # 7B layer shapes, batch 4 x 1024, 2 layers
    python bench/compile_probe.py --device cpu --hidden 128 --intermediate 256 --heads 4 --seq 64 --batch 2

Builds a Llama of ``--layers`` decoder layers with 7B shapes (random weights), NF4 + double quant, LoRA r=64 on all
linears (dropout 0.05, fused), transformers' gradient checkpointing, train mode; then one forward + backward of the
next-token loss under bf16 autocast (fp32 on CPU), eager and with ``compile_blocks`` (same model, two copies). Prints
ms per step, graph breaks, unique graphs and recompiles, and the top kernels of a profiled step for each, so the
difference shows where it comes from (launch gaps, graph breaks, recompiles or slower kernels).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_qlora.lora.layer import LoRAConfig, inject_lora, mark_only_lora_trainable
from lightning_qlora.models.compilation import compile_blocks, graph_break_counts
from lightning_qlora.quantization import QuantizationConfig, quantize_model


def build(args: argparse.Namespace, device: str) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
        max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    compute = "bf16" if device == "cuda" else "fp32"
    quantize_model(model, QuantizationConfig(compute_dtype=compute), device=device)
    inject_lora(model, LoRAConfig(r=64, alpha=16, dropout=0.05))
    mark_only_lora_trainable(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step(model: torch.nn.Module, ids: torch.Tensor, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()


def timed(model: torch.nn.Module, ids: torch.Tensor, device: str, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, ids, device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile(model: torch.nn.Module, ids: torch.Tensor, device: str, rows: int) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(model, ids, device)
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15, help="profile rows per variant")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args()
    device = args.device
    eager = build(args, device)
    compiled = copy.deepcopy(eager)
    kwargs = {"backend": args.backend, **({"mode": args.mode} if args.mode else {})}
    compile_blocks(compiled.model, **kwargs)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    from torch._dynamo.utils import counters

    result = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        start = time.perf_counter()
        step(model, ids, device)  # warmup (the compile happens here)
        first = time.perf_counter() - start
        times = timed(model, ids, device, args.steps)
        median = sorted(times)[len(times) // 2]
        tok_s = args.batch * args.seq / median * 1e3
        result[name] = {"first_step_s": round(first, 2), "ms": [round(t, 1) for t in times], "tok_s": round(tok_s)}
        print(f"{name:9s} first step {first:6.1f} s, then median {median:8.1f} ms/step = {tok_s:,.0f} tok/s")
    stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break", "inductor")}
    result["dynamo"] = {
        "graph_breaks": graph_break_counts(),
        "unique_graphs": stats.get("stats", {}).get("unique_graphs"),
        "calls_captured": stats.get("stats", {}).get("calls_captured"),
        "recompiles": stats.get("recompiles", {}),
    }
    print("dynamo:", json.dumps(result["dynamo"], default=str)[:1500])
    ratio = result["eager"]["tok_s"] and result["compiled"]["tok_s"] / result["eager"]["tok_s"]
    print(f"compiled / eager: {ratio:.2f}x")
    for name, model in (("eager", eager), ("compiled", compiled)):
        print(f"\n--- profile: {name}")
        print(profile(model, ids, device, args.rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
