"""Stack (a), ours: ``Trainer`` + ``NF4Precision`` + ``LoRA`` + ``PagedOptimizerStrategy`` fitting ``CausalLM``.

``StepTimer`` times each training batch (forward, backward, optimizer step, zero_grad) with synchronisation from
``on_train_batch_start`` to ``on_train_batch_end``; ``BuildAndStepProbe`` (``qlora_70b_step.py``) adds the build's
time and peaks and, on CPU, the live tensor peak of each step.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
from measure import (
    GIB,
    ForwardCounter,
    MemoryProbe,
    Row,
    checkpointing_on,
    memory_now_gib,
    peak_rss_bytes,
    rss_now_bytes,
    summarize,
    sync,
)
from workloads import LORA, LR, Workload, make_batches

NAME = "ours (lightning_qlora)"
COMPILED_NAME = "ours + compile_blocks"


def step_timer_class() -> type:
    """The ``StepTimer`` Lightning callback class (built on first use, so importing this module needs no lightning)."""
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
            # a Python hook inside a compiled checkpointed block is a graph break: the block would run eager
            compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in pl_module.modules())
            self.counter = None if compiled else ForwardCounter(pl_module)
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
    from lightning_qlora.lora.function import fused_base_weight
    from lightning_qlora.lora.layer import lora_modules
    from lightning_qlora.models.losses import chunked_loss_unsupported

    layers = [m for _, m in lora_modules(pl_module)]
    fused = sum(1 for m in layers if m.fused and fused_base_weight(m.base_layer) is not None)
    chunk = pl_module.hparams.get("loss_chunk_size")
    reason = chunked_loss_unsupported(pl_module.model) if chunk else "loss_chunk_size=None"
    from lightning_qlora.models.compilation import is_compiled

    return {
        "compiled_blocks": sum(1 for m in pl_module.modules() if is_compiled(m)),
        "lora_layers": len(layers),
        "fused_lora_layers": fused,
        "loss": f"chunked ({chunk} tokens)" if reason is None else f"model's own ({reason})",
    }


def bench_trainer(device: str, callbacks: list[Any], max_steps: int, root: str, compute_dtype: str = "bf16") -> Any:
    """The benchmarks' ``Trainer``: NF4 + paged AdamW 32-bit on one device, training only (no logging, validation,
    checkpoints, progress bar or model summary)."""
    import lightning as L

    from lightning_qlora import NF4Precision, PagedOptimizerStrategy

    return L.Trainer(
        accelerator="cuda" if device == "cuda" else "cpu",
        devices=1,
        plugins=[NF4Precision(compute_dtype=compute_dtype)],  # the anchor's compute dtype, on every device
        callbacks=callbacks,
        strategy=PagedOptimizerStrategy("paged_adamw_32bit"),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )


def run_ours_compiled(w: Workload, peak_tflops: float | None, isolated: bool) -> Row:
    """``run_ours`` with ``LoRA(compile_blocks=True)``: each decoder layer compiled (the compile is in the warmup)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no graphs, dynamic-shape decisions or graph-break counts from an earlier run in-process
    counters.clear()
    return run_ours(w, peak_tflops, isolated, compile_blocks=True)


def run_ours(w: Workload, peak_tflops: float | None, isolated: bool, compile_blocks: bool = False) -> Row:
    """lightning_qlora: Trainer + NF4Precision + LoRA callback + PagedOptimizerStrategy fitting CausalLM."""
    from torch.utils.data import DataLoader

    from lightning_qlora import LoRA
    from lightning_qlora.models.causal_lm import CausalLM

    probe = MemoryProbe(w.device)
    probe.reset()
    timer = step_timer_class()(w.device, probe)
    root = tempfile.mkdtemp(prefix="qlora_bench_trainer_")
    trainer = bench_trainer(
        w.device,
        [
            LoRA(
                r=LORA["r"],
                alpha=LORA["alpha"],
                dropout=w.lora_dropout,
                gradient_checkpointing=w.checkpoint_mode != "none",
                checkpoint_mode="full" if w.checkpoint_mode == "none" else w.checkpoint_mode,
                checkpoint_every_n_layers=w.checkpoint_every_n_layers,
                compile_blocks=compile_blocks,
                compile_kwargs=None if w.compile_backend == "inductor" else {"backend": w.compile_backend},
            ),
            timer,
        ],
        w.steps,
        root,
        w.compute_dtype,
    )
    # bitsandbytes' AdamW defaults to weight_decay=0.01, which the anchor uses; CausalLM's default is 0
    module = CausalLM(model=w.model_dir, dtype=w.compute_dtype, weight_decay=0.01, lr=LR)  # as the anchor loads it
    loader = DataLoader(make_batches(w), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    loop = statistics.median(timer.loop_times[w.warmup :] or timer.loop_times)
    row = summarize(
        COMPILED_NAME if compile_blocks else NAME,
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
            "checkpoint_mode": w.checkpoint_mode,
            "checkpoint_every_n_layers": w.checkpoint_every_n_layers,
            "compile_backend": w.compile_backend if compile_blocks else None,
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


def build_and_step_probe_class() -> type:
    """``StepTimer`` plus the build's time and peaks, and on CPU a live-tensor tracker around each timed step.

    The build is timed by wrapping ``configure_model`` in ``setup``: put this callback before ``LoRA`` so that LoRA's
    own wrapper (injection) stays outside the timed part. On CPU the peak (``live_peak``) is the model and optimizer
    state bytes at the start of each step after ``warmup`` plus the largest live tensor bytes inside the step.
    """
    from lightning_qlora.memory.footprint import measure_footprint
    from lightning_qlora.memory.tracker import LiveTensorTracker, tensor_bytes

    class BuildAndStepProbe(step_timer_class()):
        def __init__(self, device: str, probe: MemoryProbe, warmup: int) -> None:
            super().__init__(device, probe)
            self.warmup = warmup
            self.build_s = self.setup_s = self._t_setup = 0.0
            self.rss_before = self.rss_peak_build = self.rss_peak_train = self.model_bytes = 0
            self.build_peak: int | None = None
            self.live_peak = 0
            self._tracker: Any = None
            self._resident = 0

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self._t_setup = time.perf_counter()
            self.rss_before = rss_now_bytes()
            original = pl_module.configure_model

            def timed_configure_model() -> None:  # runs inside LoRA's wrapper: the build alone
                start = time.perf_counter()
                original()
                sync(self.device)
                self.build_s = time.perf_counter() - start
                self.rss_peak_build = peak_rss_bytes()
                if self.device == "cuda":
                    self.build_peak = torch.cuda.max_memory_allocated()

            pl_module.configure_model = timed_configure_model

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_start(trainer, pl_module)
            self.setup_s = time.perf_counter() - self._t_setup
            self.model_bytes = measure_footprint(pl_module).total_bytes

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.device != "cuda" and batch_idx >= self.warmup:  # a CPU stand-in for max_memory_allocated
                states = [v for o in trainer.optimizers for s in o.state.values() for v in s.values()]
                self._resident = self.model_bytes + tensor_bytes(v for v in states if isinstance(v, torch.Tensor))
                self._tracker = LiveTensorTracker()
                self._tracker.__enter__()
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if self._tracker is not None:
                self._tracker.__exit__(None, None, None)
                self.live_peak = max(self.live_peak, self._resident + self._tracker.peak)
                self._tracker = None

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_end(trainer, pl_module)
            # before Lightning's teardown moves the model to the CPU (a host copy of every 4-bit weight)
            self.rss_peak_train = peak_rss_bytes()

    return BuildAndStepProbe
