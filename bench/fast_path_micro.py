#!/usr/bin/env python
"""Micro-benchmarks of the fast-path pieces: fused vs plain LoRA layer fwd+bwd, chunked vs full-logits loss memory.

Examples::

    python bench/fast_path_micro.py --device cpu
    python bench/fast_path_micro.py --device cuda --tokens 8192 --features 4096

Layer: a ``features × features`` NF4+DQ layer with LoRA r=64 (alpha 16) under bf16 autocast, input bf16
``(tokens, features)``, median time of forward + backward over ``--iters`` runs after 2 warmups, dropout 0 and 0.05.
Loss: peak bytes allocated by the loss forward + backward at (B, T, V, H), counted by a TorchDispatchMode over the
storages each op creates (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), with and without chunking.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.models.losses import chunked_cross_entropy
from lightning_qlora.quantization.nf4 import QuantizationConfig, linear_to_4bit


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_layer(device: str, tokens: int, features: int, rank: int, dropout: float, fused: bool, iters: int) -> float:
    """Median ms of one forward + backward of a 4-bit LoRA layer."""
    torch.manual_seed(0)
    # a bf16 weight, as the bench models store them: bitsandbytes then dequantizes straight to bf16
    base = linear_to_4bit(nn.Linear(features, features, bias=False, dtype=torch.bfloat16), QuantizationConfig(), device)
    layer = LoRALinear(base, r=rank, alpha=16, dropout=dropout, fused=fused).to(device)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    x = torch.randn(tokens, features, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, features, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(iters + 2):
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    return statistics.median(times) * 1e3


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages ops under the mode allocate that are alive at once (checked after every op)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                storage = t.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def loss_peak(device: str, batch: int, seq: int, vocab: int, hidden: int, chunk: int | None) -> tuple[float, float]:
    """(peak MiB, ms) of the loss forward + backward; ``chunk=None``: F.cross_entropy on the full fp32 logits."""
    torch.manual_seed(0)
    h = torch.randn(batch, seq, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, vocab, (batch, seq), device=device)

    def run() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            if chunk is None:
                logits = F.linear(h, w)
                shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
                loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)
            else:
                loss = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
        loss.backward()
        h.grad = None

    run()
    sync(device)
    t = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        counter = PeakMemory()
        with counter:
            run()
        peak = counter.peak
    sync(device)
    return peak / 2**20, (time.perf_counter() - t) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--loss-shape", default="4,512,32000,256", help="B,T,V,H of the loss benchmark")
    parser.add_argument("--chunks", default="4096,1024", help="chunk sizes of the loss benchmark")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    shape = f"{args.tokens} tok, {args.features}² NF4, r={args.rank}"
    print(f"| LoRA layer {shape} | dropout | fwd+bwd ms | fused speedup |")
    print("|---|---|---|---|")
    for dropout in (0.0, 0.05):
        plain = time_layer(args.device, args.tokens, args.features, args.rank, dropout, False, args.iters)
        fused = time_layer(args.device, args.tokens, args.features, args.rank, dropout, True, args.iters)
        print(f"| plain | {dropout} | {plain:.1f} | |")
        print(f"| fused | {dropout} | {fused:.1f} | {plain / fused:.2f}× |")
    b, t, v, h = (int(s) for s in args.loss_shape.split(","))
    print(f"\n| loss B={b} T={t} V={v} H={h} | peak MiB | fwd+bwd ms |")
    print("|---|---|---|")
    for chunk in [None, *(int(c) for c in args.chunks.split(","))]:
        peak, ms = loss_peak(args.device, b, t, v, h, chunk)
        print(f"| {'full logits' if chunk is None else f'chunked {chunk}'} | {peak:.1f} | {ms:.0f} |")


if __name__ == "__main__":
    main()
