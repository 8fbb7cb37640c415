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
  paging does not exist, as our strategy falls back too), bf16 autocast, a plain loop.

Both: LoRA r=64, alpha=16, dropout=0.05 on every linear layer but the head; labels = input_ids; the same random
token batches; each step timed with synchronisation; median over the steps after the warmup.

Examples::

    python bench/qlora_vs_hf.py --device cpu --preset tiny
    python bench/qlora_vs_hf.py --device cuda --preset 7b --json bench-7b.json
    python bench/qlora_vs_hf.py --device cuda --preset 70b-slice --layers 4 8 --json bench-70b.json

See bench/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

GIB = 2**30
LORA = {"r": 64, "alpha": 16, "dropout": 0.05}
LR = 2e-4

# Llama architectures. "tiny" runs on a laptop CPU, "micro" is the unit-test preset, "7b"/"70b-slice" are the anchor's.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "micro": {
        "arch": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 1024, "max_position_embeddings": 256},
        "shapes": [(1, 64)],
        "steps": 3,
    },
    "tiny": {
        "arch": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 256},
        "shapes": [(2, 128)],
        "steps": 6,
    },
    "7b": {  # Llama-2-7B
        "arch": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096},
        "shapes": [(4, 1024), (1, 4096), (16, 512)],
        "steps": 8,
    },
    "70b-slice": {  # Llama-2-70B layers; --layers picks how many (80 in the real model)
        "arch": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 4, "num_attention_heads": 64,
                 "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096},
        "shapes": [(1, 2048)],
        "steps": 8,
        "layers": [4, 8],
        "full_layers": 80,
    },
}
# fmt: on


@dataclass
class Workload:
    """One (model, batch shape) cell of the table."""

    name: str
    model_dir: str
    n_params: int
    batch_size: int
    seq_len: int
    vocab_size: int
    steps: int
    warmup: int
    device: str
    seed: int = 0
    layers: int = 0
    threads: int | None = None


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
    """Model FLOPs utilisation, 6·N per token (forward 2N + backward 4N, the usual convention)."""
    mfu_4nt: float | None
    """4·N per token, as the anchor log printed it."""
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
    mfu_8nt: float | None = None
    """8·N per token: the 6·N step plus the forward that activation checkpointing runs again in backward."""


# --------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_now_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class MemoryProbe:
    """Peak memory of one run: CUDA ``max_memory_allocated`` + sampled device-wide used memory, or process peak RSS."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.used_max = 0
        self.used_before = 0

    def reset(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.used_before = self._used()
            self.used_max = self.used_before

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def sample(self) -> None:
        if self.device == "cuda":
            self.used_max = max(self.used_max, self._used())

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
        if self.handle is not None:
            self.handle.remove()


def summarize(
    stack: str,
    w: Workload,
    times: list[float],
    losses: list[float],
    probe: MemoryProbe,
    peak_tflops: float | None,
    **kw: Any,
) -> Row:
    steady = times[w.warmup :] or times
    step = statistics.median(steady)
    tok_s = w.batch_size * w.seq_len / step
    peak, kind, used = probe.peak()
    mfu = 6 * w.n_params * tok_s / (peak_tflops * 1e12) if peak_tflops else None
    mfu4 = 4 * w.n_params * tok_s / (peak_tflops * 1e12) if peak_tflops else None
    mfu8 = 8 * w.n_params * tok_s / (peak_tflops * 1e12) if peak_tflops else None
    return Row(
        workload=w.name,
        stack=stack,
        step_ms=step * 1e3,
        tok_s=tok_s,
        peak_gib=peak,
        peak_kind=kind,
        device_used_gib=used,
        mfu=mfu,
        mfu_4nt=mfu4,
        mfu_8nt=mfu8,
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


def make_batches(w: Workload) -> list[dict[str, torch.Tensor]]:
    """The same random token batches for both stacks (labels = input_ids, no padding)."""
    gen = torch.Generator().manual_seed(w.seed)
    out = []
    for _ in range(w.steps):
        ids = torch.randint(0, w.vocab_size, (w.batch_size, w.seq_len), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


# --------------------------------------------------------------------------- the model
def build_model_dir(arch: dict[str, Any], path: Path, device: str, seed: int = 0, init_std: float | None = None) -> int:
    """Random-init a bf16 Llama with ``arch`` and ``save_pretrained`` it (safetensors); returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**arch, tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


# --------------------------------------------------------------------------- stack (b): the anchor
def run_anchor(w: Workload, peak_tflops: float | None, isolated: bool) -> Row:
    """HF + peft + bitsandbytes, line for line as in the anchor script (CPU: device_map cpu, unpaged AdamW32bit)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    probe = MemoryProbe(w.device)
    probe.reset()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    device_map = {"": 0} if w.device == "cuda" else {"": "cpu"}
    model = LlamaForCausalLM.from_pretrained(
        w.model_dir, dtype=torch.bfloat16, device_map=device_map, quantization_config=quant
    )
    loaded_gib = memory_now_gib(w.device)  # where the anchor script reads "weights"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # paged optimizers need CUDA: on CPU the unpaged class (same math), as lightning_qlora's strategy does
    opt_cls = bnb.optim.PagedAdamW32bit if w.device == "cuda" else bnb.optim.AdamW32bit
    opt = opt_cls(params, lr=LR)
    counter = ForwardCounter(model)
    before_first_step = memory_now_gib(w.device)
    times, losses, calls = [], [], []
    for batch in make_batches(w):
        ids = batch["input_ids"].to(w.device)
        before = counter.calls
        sync(w.device)
        t = time.perf_counter()
        with torch.autocast(w.device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(w.device)
        times.append(time.perf_counter() - t)
        probe.sample()
        losses.append(float(loss.detach()))
        calls.append(counter.calls - before)
    counter.remove()
    row = summarize(
        "anchor (HF+peft+bnb)",
        w,
        times,
        losses,
        probe,
        peak_tflops,
        optimizer=type(opt).__name__,
        gc_forward_calls=calls,
        train_mode=model.training,
        isolated=isolated,
        extra={
            "weights_loaded_gib": loaded_gib,
            "before_first_step_gib": before_first_step,
            "trainable_params": sum(p.numel() for p in params),
            "gradient_checkpointing": checkpointing_on(model.base_model.model),
            "device_used_before_gib": probe.used_before / GIB if w.device == "cuda" else None,
        },
    )
    del model, opt, params, loss
    gc.collect()
    if w.device == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- stack (a): ours
def _step_timer_class() -> type:
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Times each training batch (forward, backward, optimizer step, zero_grad) with synchronisation."""

        def __init__(self, device: str, probe: MemoryProbe) -> None:
            self.device = device
            self.probe = probe
            self.times: list[float] = []
            self.loop_times: list[float] = []
            self.losses: list[float] = []
            self.calls: list[int] = []
            self.counter: ForwardCounter | None = None
            self.train_mode = False
            self.gradient_checkpointing = False
            self.trainable = 0
            self.fast_path: dict[str, Any] = {}
            self.before_first_step_gib = 0.0
            self._t0 = self._last_end = 0.0
            self._calls0 = 0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.counter = ForwardCounter(pl_module)
            self.probe.sample()
            self.before_first_step_gib = memory_now_gib(self.device)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                self.train_mode = pl_module.model.training
                self.gradient_checkpointing = checkpointing_on(pl_module.model)
                self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
                self.fast_path = fast_path_info(pl_module)
            self._calls0 = self.counter.calls if self.counter else 0
            sync(self.device)
            self._t0 = time.perf_counter()
            if not self._last_end:
                self._last_end = self._t0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            sync(self.device)
            now = time.perf_counter()
            self.times.append(now - self._t0)
            self.loop_times.append(now - self._last_end)  # also the loop's own work between batches
            self._last_end = now
            self.probe.sample()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss.detach()))
            self.calls.append((self.counter.calls if self.counter else 0) - self._calls0)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.counter is not None:
                self.counter.remove()

    return StepTimer


def fast_path_info(pl_module: Any) -> dict[str, Any]:
    """Which of lightning_qlora's fast paths the run takes: fused LoRA layers and the chunked loss."""
    from lightning_qlora.lora import lora_modules
    from lightning_qlora.lora_function import fused_base_weight
    from lightning_qlora.losses import chunked_loss_unsupported

    layers = [m for _, m in lora_modules(pl_module)]
    fused = sum(1 for m in layers if m.fused and fused_base_weight(m.base_layer) is not None)
    chunk = pl_module.hparams.get("loss_chunk_size")
    reason = chunked_loss_unsupported(pl_module.model) if chunk else "loss_chunk_size=None"
    return {
        "lora_layers": len(layers),
        "fused_lora_layers": fused,
        "loss": f"chunked ({chunk} tokens)" if reason is None else f"model's own ({reason})",
    }


def run_ours(w: Workload, peak_tflops: float | None, isolated: bool) -> Row:
    """lightning_qlora: Trainer + NF4Precision + LoRA callback + PagedOptimizerStrategy fitting CausalLM."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_qlora import LoRA, NF4Precision, PagedOptimizerStrategy
    from lightning_qlora.model import CausalLM

    probe = MemoryProbe(w.device)
    probe.reset()
    timer = _step_timer_class()(w.device, probe)
    root = tempfile.mkdtemp(prefix="qlora_bench_trainer_")
    trainer = L.Trainer(
        accelerator="cuda" if w.device == "cuda" else "cpu",
        devices=1,
        plugins=[NF4Precision()],
        callbacks=[
            LoRA(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], gradient_checkpointing=True),
            timer,
        ],
        strategy=PagedOptimizerStrategy("paged_adamw_32bit"),
        max_steps=w.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    # bitsandbytes' AdamW defaults to weight_decay=0.01, which the anchor uses; CausalLM's default is 0
    module = CausalLM(model=w.model_dir, weight_decay=0.01, lr=LR)
    loader = DataLoader(make_batches(w), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    loop = statistics.median(timer.loop_times[w.warmup :] or timer.loop_times)
    row = summarize(
        "ours (lightning_qlora)",
        w,
        timer.times,
        timer.losses,
        probe,
        peak_tflops,
        optimizer=", ".join(type(o).__name__ for o in trainer.optimizers),
        gc_forward_calls=timer.calls,
        train_mode=timer.train_mode,
        isolated=isolated,
        extra={
            "loop_step_ms": loop * 1e3,
            "loop_tok_s": w.batch_size * w.seq_len / loop,
            "before_first_step_gib": timer.before_first_step_gib,
            "trainable_params": timer.trainable,
            "gradient_checkpointing": timer.gradient_checkpointing,
            "fast_path": timer.fast_path,
            "device_used_before_gib": probe.used_before / GIB if w.device == "cuda" else None,
        },
    )
    del trainer, module, loader, timer
    gc.collect()
    if w.device == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(root, ignore_errors=True)
    return row


STACKS = {"anchor": run_anchor, "ours": run_ours}


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
    """Run one stack in a fresh process of this script (process peak RSS and CUDA memory start from zero)."""
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


# --------------------------------------------------------------------------- the bench
def workloads_for(
    preset: str,
    device: str,
    workdir: Path,
    layers: list[int] | None = None,
    shapes: list[tuple[int, int]] | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    init_std: float | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> list[tuple[dict[str, Any], list[Workload]]]:
    """(arch, workloads) per model to build; the model directories are filled in when built."""
    spec = PRESETS[preset]
    layer_counts = layers or spec.get("layers") or [spec["arch"]["num_hidden_layers"]]
    steps = steps or spec["steps"]
    warmup = min(2, steps - 1) if warmup is None else warmup
    out = []
    for count in layer_counts:
        arch = dict(spec["arch"], num_hidden_layers=count)
        tag = preset if count == spec["arch"]["num_hidden_layers"] and "layers" not in spec else f"{preset} {count}L"
        model_dir = str(workdir / f"{preset}-{count}L")
        cells = [
            Workload(
                name=f"{tag} {bs}x{seq}",
                model_dir=model_dir,
                n_params=0,
                batch_size=bs,
                seq_len=seq,
                vocab_size=arch["vocab_size"],
                steps=steps,
                warmup=warmup,
                device=device,
                seed=seed,
                layers=count,
                threads=threads,
            )
            for bs, seq in (shapes or spec["shapes"])
        ]
        out.append((dict(arch, _init_std=init_std), cells))
    return out


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
    log: Any = print,
) -> list[Row]:
    """Build each model once, run every stack on every batch shape, and return the rows (with ours/anchor ratios).

    Args:
        preset: ``micro``, ``tiny``, ``7b`` or ``70b-slice``.
        device: ``cpu`` or ``cuda``.
        stacks: which of ``anchor``/``ours`` to run, in that order.
        layers: decoder-layer counts (one model each); default the preset's.
        shapes: ``(batch, seq)`` pairs; default the preset's.
        steps: training steps per run (timed); default the preset's.
        warmup: leading steps left out of the median (default 2, or steps - 1 when fewer).
        peak_tflops: the device's peak dense bf16 TFLOP/s for MFU (None: MFU n/a).
        isolate: run each stack in a fresh subprocess (default: on CPU, where peak RSS cannot be reset).
        init_std: re-draw every matrix from N(0, init_std) (default: transformers' init, std 0.02).
        workdir: where the random checkpoints go (default a temp dir, removed afterwards).
        seed: seed of the weights and of the token batches.
        threads: torch CPU threads in every run (default torch's; 1 is steadier on a busy machine).
        repeat: run each stack this many times, alternating, and keep the run with the median tok/s (peaks: max).
        keep_models: leave the random checkpoints in ``workdir`` (``<preset>-<layers>L``) instead of deleting them.
        log: progress printer.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    isolate = (device == "cpu") if isolate is None else isolate
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="qlora_bench_")) if own_dir else Path(workdir)
    base.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        for arch, cells in workloads_for(preset, device, base, layers, shapes, steps, warmup, init_std, seed, threads):
            init = arch.pop("_init_std")
            model_dir = Path(cells[0].model_dir)
            t = time.perf_counter()
            n = build_model_dir(arch, model_dir, device, seed=seed, init_std=init)
            took = time.perf_counter() - t
            log(f"built {arch['num_hidden_layers']}-layer model ({n / 1e9:.3f}B params) in {took:.0f} s")
            for w in cells:
                w.n_params = n
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
                by_stack = {stack: merge_repeats(found) for stack, found in runs.items()}
                rows.extend(by_stack[stack] for stack in stacks if stack in by_stack)
                if "ours" in by_stack and "anchor" in by_stack:
                    ours, anchor = by_stack["ours"], by_stack["anchor"]
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


# --------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    import bitsandbytes
    import lightning
    import peft
    import transformers

    import lightning_qlora

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "lightning": lightning.__version__,
        "lightning_qlora": lightning_qlora.__version__,
    }


def device_name(device: str) -> str:
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


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def format_table(rows: list[Row]) -> str:
    """A markdown table: one line per (workload, stack)."""
    head = (
        "| workload | stack | step ms | tok/s | peak GiB | device-used GiB | MFU | MFU 8N | tok/s ours/anchor | "
        "peak ours/anchor | step-1 loss |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.stack} | {r.step_ms:,.1f} | {r.tok_s:,.0f} | {r.peak_gib:.2f} | "
            f"{_fmt(r.device_used_gib, '.2f')} | {_fmt(None if r.mfu is None else r.mfu * 100, '.1f', '%')} | "
            f"{_fmt(None if r.mfu_8nt is None else r.mfu_8nt * 100, '.1f', '%')} | "
            f"{_fmt(r.ratio_tok_s, '.2f', '×')} | {_fmt(r.ratio_peak, '.2f', '×')} | {r.first_loss:.4f} |"
        )
    return "\n".join(lines)


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


def notes(rows: list[Row], device: str, preset: str, peak_tflops: float | None) -> list[str]:
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
                " of a fresh process per stack (imports included)"
                if r.isolated and device == "cpu"
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
        f"MFU = 6·N·tok/s / {peak_tflops:g} TFLOP/s, N = all parameters of the base model (the anchor log used 4·N·T; "
        "see mfu_4nt in --json); MFU 8N = 8·N·tok/s / peak: the 6·N step plus the forward that gradient "
        "checkpointing recomputes"
        if peak_tflops
        else "MFU n/a (pass --peak-tflops)"
    )
    for r in rows:
        if r.gc_forward_calls and any(c != 2 for c in r.gc_forward_calls):
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
            out.append(
                f"{r.workload} ours: fused LoRA on {fast['fused_lora_layers']}/{fast['lora_layers']} adapted layers; "
                f"loss: {fast['loss']}"
            )
        if "loop_step_ms" in r.extra:
            out.append(
                f"{r.workload} ours: {r.extra['loop_step_ms']:,.1f} ms/step end to end through Lightning's loop "
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


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        bs, _, seq = part.strip().lower().partition("x")
        out.append((int(bs), int(seq)))
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layers (one model per value), e.g. 4 8")
    parser.add_argument("--shapes", type=parse_shapes, help="batch x seq list, e.g. 4x1024,1x4096")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="steps left out of the median (default 2)")
    parser.add_argument("--stacks", default="anchor,ours", help="comma list of anchor, ours (default both)")
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
    parser.add_argument("--json", help="write the rows (and versions, device, command) to this file")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        _child(args._child)
        return []
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if args.device == "cuda" else None)
    stacks = tuple(s.strip() for s in args.stacks.split(",") if s.strip())
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        parser.error(f"unknown stacks {unknown}; use anchor, ours")
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
        f"workload: NF4 + double quant, bf16 compute/autocast; LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"dropout={LORA['dropout']} on all linear layers but lm_head; gradient checkpointing; "
        f"{'PagedAdamW32bit' if args.device == 'cuda' else 'AdamW32bit (paged needs CUDA)'} lr {LR:g}; "
        "labels = input_ids",
    ]
    print("\n".join(header), flush=True)
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
        log=lambda s: print(f"  .. {s}", flush=True),
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
        payload = {
            "command": command,
            "versions": info,
            "device": dev,
            "preset": args.preset,
            "peak_tflops": peak,
            "rows": [asdict(r) for r in rows],
            "notes": lines,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return rows


if __name__ == "__main__":
    main()
