"""``RunSummary``: tokens/s and peak memory while training, and a short table at the end of the run.

It also keeps the console of a run readable: training progress in steps with tokens/s
(:class:`~lightning_qlora.callbacks.progress.QLoRAProgressBar` in place of Lightning's stock bar), and none of the
deprecation warnings Lightning's own code raises (see
:class:`~lightning_qlora.callbacks.progress.QuietLightningInternals`).

At fit end the table also shows the :mod:`~lightning_qlora.memory.planner`'s prediction for the run (its model
config, the largest batch seen, the LoRA callback, the precision plugin, the strategy and, for a
:class:`~lightning_qlora.PreferenceLM`, its objective) next to the measured peak.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_qlora.callbacks.fit_outputs import keep_existing_output, optimizer_steps_this_fit
from lightning_qlora.callbacks.lora import LoRA
from lightning_qlora.callbacks.progress import QuietLightningInternals, count_tokens, use_qlora_progress_bar
from lightning_qlora.memory.footprint import measure_footprint
from lightning_qlora.memory.planner import MemoryPlan, plan_memory
from lightning_qlora.models.preference import PreferenceLM
from lightning_qlora.plugins.precision import NF4Precision
from lightning_qlora.utils.atomic import atomic_write_text
from lightning_qlora.utils.formatting import format_bytes
from lightning_qlora.utils.modules import model_root

log = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory and what it measures: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS else."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process peak RSS"


class RunSummary(Callback):
    """Log ``tokens_per_sec`` (non-padding tokens through the model) and peak memory; print a table at fit end.

    Args:
        log_every_n_steps: how often to log throughput.
        progress_bar: show training as :class:`~lightning_qlora.callbacks.progress.QLoRAProgressBar` (``step 3/40``,
            loss, tokens/s) instead of Lightning's stock bar; ``enable_progress_bar=False`` still means no bar.
    """

    def __init__(self, log_every_n_steps: int = 10, progress_bar: bool = True) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.progress_bar = progress_bar
        self._quiet = QuietLightningInternals()
        self.tokens = 0
        self.seconds = 0.0
        self._start = 0.0
        self._window_tokens = 0
        self._window_start = 0.0
        self.rows: dict[str, str] = {}
        self.batch_shape: tuple[int, int] | None = None
        """Largest ``(batch, sequence)`` of ``input_ids`` seen in training (what the plan is made for)."""
        self.plan: MemoryPlan | None = None
        """The planner's prediction for this run, made at fit end (``None`` when it cannot plan the model)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.progress_bar:
            use_qlora_progress_bar(trainer)
        self._quiet.enter()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._quiet.exit()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._quiet.exit()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()
        if not self._window_start:
            self._window_start = self._start

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        tokens = count_tokens(batch)
        shape = _batch_shape(batch)
        if shape is not None and (self.batch_shape is None or math.prod(shape) > math.prod(self.batch_shape)):
            self.batch_shape = shape
        self.tokens += tokens
        self.seconds += now - self._start
        self._window_tokens += tokens
        if trainer.global_step % self.log_every_n_steps == 0 and trainer.loggers:
            rate = self._window_tokens / max(now - self._window_start, 1e-9)
            peak, _ = peak_memory_bytes(trainer.strategy.root_device)
            pl_module.log_dict({"tokens_per_sec": rate, "peak_memory_gib": peak / 2**30}, batch_size=1)
            self._window_tokens, self._window_start = 0, now

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the table and write ``summary.json``, unless this fit trained no step and the file is there.

        An existing ``summary.json`` is kept (one warning line) after a fit of 0 optimizer steps, unless
        ``overwrite`` is set on this callback (``lightning-qlora fit --overwrite true`` sets it).
        """
        self.rows = self.collect(trainer, pl_module)
        self._print()
        path = Path(trainer.default_root_dir) / "summary.json"
        steps = optimizer_steps_this_fit(trainer)
        if steps is None:  # no LoRA callback counted: did a training batch run in this fit?
            steps = int(self.seconds > 0)
        if not keep_existing_output(trainer, path, "run summary", bool(getattr(self, "overwrite", False)), steps):
            self._write(path, getattr(pl_module, "val_history", []))

    @rank_zero_only
    def _write(self, path: Path, history: list) -> None:
        """Write the table and the held-out loss history as JSON (temp file + fsync + rename).

        Raises:
            DiskFullError: if the device is full (the previous ``summary.json`` is kept).
        """
        payload = {"rows": self.rows, "val_history": [{"step": s, "val_loss": v} for s, v in history]}
        atomic_write_text(path, json.dumps(payload, indent=2))

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        """The summary as ordered label -> value strings."""
        footprint = measure_footprint(pl_module)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        peak, what = peak_memory_bytes(trainer.strategy.root_device)
        rows = {
            "trainable params": f"{trainable:,}",
            "4-bit weights": f"{footprint.quantized_bytes / 2**20:.1f} MiB ({footprint.bits_per_quantized_param:.3f} "
            f"bits/param over {footprint.quantized_params:,} params)",
            "unquantized params": f"{footprint.unquantized_bytes / 2**20:.1f} MiB",
            "adapter": f"{footprint.adapter_bytes / 2**20:.1f} MiB",
            "steps": str(trainer.global_step),
            "tokens/s (train)": f"{self.tokens / self.seconds:,.0f}" if self.seconds else "n/a",
            f"peak memory ({what})": format_bytes(peak),
        }
        self.plan = plan_for_run(trainer, pl_module, self.batch_shape) if self.batch_shape else None
        if self.plan is not None:
            predicted = self.plan.peak
            if what.startswith("cuda"):
                ratio = predicted / max(peak, 1)
                rows["predicted peak (planner)"] = f"{format_bytes(predicted)} (predicted / measured = {ratio:.2f})"
            else:
                rows["predicted peak (planner)"] = (
                    f"{format_bytes(predicted)} of tensors (the measured peak RSS also counts Python, libraries "
                    "and the allocator's cache: not comparable on CPU)"
                )
        history = getattr(pl_module, "val_history", [])
        if history:
            rows["held-out loss before"] = f"{history[0][1]:.4f} (step {history[0][0]})"
            rows["held-out loss after"] = f"{history[-1][1]:.4f} (step {history[-1][0]})"
        for callback in trainer.callbacks:
            for label, value in getattr(callback, "summary_rows", lambda: {})().items():
                rows[label] = value
        return rows

    @rank_zero_only
    def _print(self) -> None:
        width = max(len(k) for k in self.rows)
        lines = ["", "lightning-qlora run summary", "-" * (width + 40)]
        lines += [f"{k.ljust(width)}  {v}" for k, v in self.rows.items()]
        print("\n".join(lines), flush=True)


def plan_for_run(trainer: pl.Trainer, pl_module: pl.LightningModule, batch_shape: tuple[int, int]) -> MemoryPlan | None:
    """The planner's prediction for a (running) fit: model config, LoRA callback, precision plugin, strategy.

    A :class:`~lightning_qlora.PreferenceLM` is planned as its objective's step (``preference=method``: sequence
    scores, and the reference forward for DPO and IPO). Its batches already hold the chosen and the rejected
    sequences (``2B`` rows of ``input_ids``), which is what the planner's ``batch_size`` counts: nothing is doubled.

    Args:
        trainer: the Trainer.
        pl_module: the module; its wrapped network must have a transformers ``config``.
        batch_shape: ``(batch, sequence)`` of ``input_ids`` per device (sequences, not pairs).

    Returns:
        The plan, or ``None`` when the model or setup is not one the planner knows (logged at debug level).
    """
    root = model_root(pl_module)
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    lora = next((c for c in trainer.callbacks if isinstance(c, LoRA)), None)
    plugin = trainer.precision_plugin
    strategy = trainer.strategy
    embeddings = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    hparams = getattr(pl_module, "hparams", {})
    try:
        return plan_memory(
            config,
            batch_size=batch_shape[0],
            seq_len=batch_shape[1],
            lora=lora.config if lora else None,
            quantization=plugin.config if isinstance(plugin, NF4Precision) else None,
            quantize=isinstance(plugin, NF4Precision),
            optimizer=getattr(strategy, "optimizer_name", "adamw"),
            gradient_checkpointing=bool(lora and lora.gradient_checkpointing),
            dtype=embeddings.weight.dtype if embeddings is not None else "bf16",
            devices=max(1, trainer.world_size),
            sharding="fsdp" if "fsdp" in type(strategy).__name__.lower() else "ddp",
            loss_chunk_size=hparams.get("loss_chunk_size") if hasattr(hparams, "get") else None,
            device_type=strategy.root_device.type,
            preference=pl_module.method if isinstance(pl_module, PreferenceLM) else None,
        )
    except Exception as err:  # a model the planner does not know must not break the summary
        log.debug("RunSummary: no memory plan for %s (%s)", type(root).__name__, err)
        return None


def _batch_shape(batch: Any) -> tuple[int, int] | None:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return int(ids.shape[0]), int(ids.shape[1])
    return None
