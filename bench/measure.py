"""How the benchmarks measure: memory probes, forward counters, one ``Row`` of results, MFU, versions and the device.

FLOPs per token of a QLoRA step over a frozen base of N parameters (the adapters add ~1-3 %, not counted): forward
``2N`` + backward ``2N`` (input gradients only: the frozen weights get none) = ``4N``, the model FLOPs of MFU and
what the anchor log printed; the forward that activation checkpointing runs again makes ``6N``, the hardware FLOPs
of HFU (the issue's "6·N·T FLOPs of a checkpointed step").
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from workloads import Workload

GIB = 2**30


def sync(device: str) -> None:
    """Wait for the device's queued kernels (a no-op on CPU), so a timer sees the work done."""
    if device == "cuda":
        torch.cuda.synchronize()


def rss_now_bytes() -> int:
    """The process's resident set now (``VmRSS``; the peak where /proc does not exist)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def device_used_bytes() -> int:
    """Device-wide used memory, ``total - free`` from ``torch.cuda.mem_get_info`` (what nvidia-smi shows as used)."""
    free, total = torch.cuda.mem_get_info()
    return total - free


class MemoryProbe:
    """Peak memory of one run: CUDA ``max_memory_allocated`` + sampled device-wide used memory, or process peak RSS."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.used_max = 0
        self.used_before = 0

    def reset(self) -> None:
        """Forget earlier peaks (CUDA); the device-wide sampling starts from what is used now."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.used_before = device_used_bytes()
            self.used_max = self.used_before

    def sample(self) -> None:
        """Record the device-wide used memory now (CUDA; a no-op on CPU)."""
        if self.device == "cuda":
            self.used_max = max(self.used_max, device_used_bytes())

    def peak(self) -> tuple[float, str, float | None]:
        """(peak GiB, what it is, device-wide used GiB or None)."""
        if self.device == "cuda":
            self.sample()
            return torch.cuda.max_memory_allocated() / GIB, "cuda max_memory_allocated", self.used_max / GIB
        return peak_rss_bytes() / GIB, "process peak RSS", None


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether transformers' activation checkpointing is enabled on ``model`` (either spelling of the flag)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the second is deprecated in 5.x
        if hasattr(type(model), name) or name in dir(model):
            return bool(getattr(model, name))
    return False


def memory_now_gib(device: str) -> float:
    """Allocated CUDA memory, or the process's resident set on CPU."""
    return (torch.cuda.memory_allocated() if device == "cuda" else rss_now_bytes()) / GIB


class ForwardCounter:
    """Counts calls into one module (the first decoder layer's MLP), recomputation by checkpointing included.

    A pre-hook, not a forward hook: non-reentrant checkpointing stops recomputing as soon as it has the tensors
    backward needs, which can be before the MLP returns, so a forward hook would miss the recomputation.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        target = next((m for n, m in model.named_modules() if n.endswith("layers.0.mlp")), None)
        self.handle = target.register_forward_pre_hook(self._hook) if target is not None else None

    def _hook(self, *args: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        """Take the hook off the module."""
        if self.handle is not None:
            self.handle.remove()


def mfu(n_params: int, tok_s: float, peak_tflops: float | None, flops_per_param: int = 4) -> float | None:
    """``flops_per_param · N · tok/s / peak FLOP/s`` (None without a peak)."""
    return flops_per_param * n_params * tok_s / (peak_tflops * 1e12) if peak_tflops else None


@dataclass
class Row:
    """One stack's measurements on one workload."""

    workload: str
    stack: str
    step_ms: float
    tok_s: float
    peak_gib: float
    peak_kind: str
    device_used_gib: float | None
    mfu: float | None
    """Model FLOPs utilisation: 4·N per token (forward 2N + input-gradient backward 2N over the frozen base)."""
    first_loss: float
    losses: list[float]
    step_times_ms: list[float]
    n_params: int
    batch_size: int
    seq_len: int
    layers: int
    steps: int
    warmup: int
    optimizer: str
    gc_forward_calls: list[int]
    """Forward calls of the first decoder layer's MLP per step: 2 = gradient checkpointing really recomputed."""
    train_mode: bool
    isolated: bool
    extra: dict[str, Any] = field(default_factory=dict)
    ratio_tok_s: float | None = None
    ratio_peak: float | None = None
    hfu: float | None = None
    """Hardware FLOPs utilisation: 6·N per token, the 4·N step plus the forward checkpointing runs again."""


def summarize(
    stack: str,
    w: Workload,
    times: list[float],
    losses: list[float],
    probe: MemoryProbe,
    peak_tflops: float | None,
    **kw: Any,
) -> Row:
    """One ``Row`` from per-step seconds and losses: the median step after the warmup, tok/s, peaks and MFU."""
    steady = times[w.warmup :] or times
    step = statistics.median(steady)
    tok_s = w.batch_size * w.seq_len / step
    peak, kind, used = probe.peak()
    return Row(
        workload=w.name,
        stack=stack,
        step_ms=step * 1e3,
        tok_s=tok_s,
        peak_gib=peak,
        peak_kind=kind,
        device_used_gib=used,
        mfu=mfu(w.n_params, tok_s, peak_tflops, 4),
        hfu=mfu(w.n_params, tok_s, peak_tflops, 6),
        first_loss=losses[0],
        losses=losses,
        step_times_ms=[t * 1e3 for t in times],
        n_params=w.n_params,
        batch_size=w.batch_size,
        seq_len=w.seq_len,
        layers=w.layers,
        steps=w.steps,
        warmup=w.warmup,
        **kw,
    )


def merge_repeats(rows: list[Row]) -> Row:
    """The run with the median tok/s of repeated runs, with the largest peaks and every run's step time in extra."""
    if len(rows) == 1:
        return rows[0]
    ordered = sorted(rows, key=lambda r: r.tok_s)
    chosen = replace(ordered[(len(ordered) - 1) // 2], extra=dict(ordered[(len(ordered) - 1) // 2].extra))
    chosen.peak_gib = max(r.peak_gib for r in rows)
    used = [r.device_used_gib for r in rows if r.device_used_gib is not None]
    chosen.device_used_gib = max(used) if used else None
    chosen.extra["repeat_step_ms"] = [r.step_ms for r in rows]
    chosen.extra["busy_cores_before"] = max((r.extra.get("busy_cores_before") or 0.0 for r in rows), default=None)
    return chosen


# --------------------------------------------------------------------------- where it ran
def versions(packages: tuple[str, ...] = ("transformers", "peft", "bitsandbytes", "lightning")) -> dict[str, str]:
    """Versions of python, torch, ``packages`` and lightning_qlora (``not installed`` for a missing package)."""
    import importlib

    import lightning_qlora

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in packages:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    out["lightning_qlora"] = lightning_qlora.__version__
    return out


def device_name(device: str) -> str:
    """``<GPU> (<GiB>), CUDA <version>`` or ``CPU <model>, <cores> logical cores, torch threads <n>``."""
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now (from /proc/stat; None where it does not exist)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def cpu_busy_note(threads: int, busy: float | None) -> str | None:
    """A warning when other processes leave fewer idle cores than the run's threads (timings then swing wildly)."""
    cores = os.cpu_count() or 1
    if busy is None or busy + threads <= cores + 0.25:
        return None
    return (
        f"WARNING: other processes kept {busy:.1f} of {cores} cores busy at some point of the run and torch used "
        f"{threads} threads: with more threads than idle cores every parallel op can wait a scheduler slice, so "
        "step times swing by 10x or more; rerun on an idle machine, with --threads 1, or with --repeat 3"
    )
