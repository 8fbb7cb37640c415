"""Predict the memory of a QLoRA training step before running it: weights, adapters, optimizer, activations.

Parameter, adapter and optimizer bytes are counted exactly, from the model built on the ``meta`` device (no
memory) and bitsandbytes' storage rules (:mod:`lightning_qlora.memory.storage_bytes`). Activations follow what autograd
keeps for a Llama-style decoder layer, phase by phase through the step (:mod:`lightning_qlora.memory.activations`,
with :mod:`~lightning_qlora.memory.moe` for experts layers and :mod:`~lightning_qlora.memory.preference` for
preference tuning). Here they are put together per device (FSDP shards, DDP buckets, CUDA workspaces) into a
:class:`MemoryPlan`, which prints as a table and advises when a budget is short. The measured check is
``tests/memory/test_planner.py`` (live tensor bytes of a CPU step, within 15%).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from lightning_qlora.lora.layer import LoRAConfig, find_lora_targets
from lightning_qlora.memory.activations import PHASES, activation_phases
from lightning_qlora.memory.parameters import quantized_stacks, unquantized_kinds
from lightning_qlora.memory.storage_bytes import code_table_bytes, optimizer_bytes, quantized_bytes
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.quantization.shells import linear_shape, shell_candidates
from lightning_qlora.utils.dtypes import DTypeLike, dtype_name, to_dtype
from lightning_qlora.utils.formatting import GIB, MIB, format_bytes

__all__ = ["MemoryPlan", "code_table_bytes", "optimizer_bytes", "plan_memory", "quantized_bytes"]

CUDA_WORKSPACE_BYTES = 64 * 2**20  # cuBLAS/cuDNN workspaces the caching allocator holds during a step


@dataclass
class MemoryPlan:
    """Predicted bytes of one training step on one device (sizes in bytes; ``format_table`` prints GiB or MiB)."""

    quantized_weights: int
    """4-bit codes plus absmax, nested constants and shared code tables, as bitsandbytes stores them."""
    quantized_params: int
    """Number of weights stored in 4 bits (on this device: divided by the device count under FSDP)."""
    unquantized_weights: int
    """Embeddings, norms, biases and the output head in their dtype."""
    adapters: int
    """LoRA ``A``/``B`` master weights."""
    adapter_params: int
    """Number of LoRA parameters (on this device)."""
    gradients: int
    """Gradients of the adapters (all alive at the end of backward)."""
    optimizer_states: int
    """Optimizer state bytes (paged or not)."""
    paged_optimizer_states: int
    """The part of ``optimizer_states`` in CUDA managed memory (invisible to ``torch.cuda.max_memory_allocated``)."""
    activations: int
    """Largest activation bytes during the step (the dequantized weight being multiplied included), with the
    planned checkpointing setting."""
    activations_with_checkpointing: int
    """Activation peak with gradient checkpointing on."""
    activations_without_checkpointing: int
    """Activation peak with gradient checkpointing off."""
    overhead: int
    """cuBLAS workspaces (CUDA), plus FSDP's gathered layers or DDP's gradient buckets on several devices."""
    resident: int
    """Bytes alive between steps: weights, adapters and the unpaged optimizer state."""
    peak: int
    """Predicted peak of the device allocator (what ``torch.cuda.max_memory_allocated`` reports); gradients and
    activations peak at different moments of the step, so it is less than the sum of the parts."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What was planned: model size, batch, sequence, LoRA, optimizer, devices, sharding."""

    @property
    def total(self) -> int:
        """Peak plus the paged optimizer state: device memory used when nothing is paged out."""
        return self.peak + self.paged_optimizer_states

    @property
    def step_bytes(self) -> int:
        """What one step allocates on top of the resident bytes: activations, gradients, temporaries."""
        return self.peak - self.resident

    @property
    def bits_per_quantized_param(self) -> float:
        """Average storage per 4-bit weight, constants included."""
        return 8 * self.quantized_weights / self.quantized_params if self.quantized_params else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Fields plus ``total``, for JSON and loggers."""
        return {**asdict(self), "total": self.total}

    def replan(self, **changes: Any) -> MemoryPlan:
        """The same plan with some :func:`plan_memory` arguments changed (e.g. ``batch_size=2``)."""
        return plan_memory(**{**self.settings["arguments"], **changes})

    def advice(self, budget_bytes: int) -> list[str]:
        """Short suggestions that lower the predicted peak toward ``budget_bytes``; empty when it already fits.

        Each names the change and the peak it leads to; a change that would not lower the peak is left out.
        """
        if self.peak <= budget_bytes:
            return []
        s, args = self.settings, self.settings["arguments"]
        options: list[tuple[str, dict[str, Any]]] = []
        if not s["gradient_checkpointing"]:
            options.append(("turn gradient checkpointing on (LoRA(gradient_checkpointing=True))",
                            {"gradient_checkpointing": True}))  # fmt: skip
        per = 2 if args.get("preference") else 1  # a preference batch is whole pairs: 2 sequences each
        batch, fitting, low, high = s["batch_size"] // per, None, 1, s["batch_size"] // per - 1
        while low <= high:  # the peak grows with the batch: bisect for the largest one that fits
            mid = (low + high) // 2
            if self.replan(batch_size=mid * per).peak <= budget_bytes:
                fitting, low = mid, mid + 1
            else:
                high = mid - 1
        if fitting:
            steps, unit = math.ceil(batch / fitting), " pairs" if per == 2 else ""
            text = f"batch {batch} -> {fitting}{unit} with accumulate_grad_batches={steps}"
            options.append((text, {"batch_size": fitting * per}))
        if s["optimizer"] != "paged_adamw_8bit":
            text = "use the paged_adamw_8bit optimizer (PagedOptimizerStrategy)"
            options.append((text, {"optimizer": "paged_adamw_8bit"}))
        if to_dtype(s["adapter_dtype"]).itemsize > 2:
            bf16 = replace(args["lora"], dtype="bfloat16")
            options.append(("keep adapters in bf16 (LoRA(dtype='bf16'))", {"lora": bf16}))
        if not args.get("loss_chunk_size"):
            options.append(("compute the loss in chunks (CausalLM(loss_chunk_size=4096))", {"loss_chunk_size": 4096}))
        if s["sharding"] != "fsdp" or s["devices"] < 8:
            n = max(2, s["devices"] * 2) if s["sharding"] == "fsdp" else 2
            options.append((f"shard with FSDP over {n} GPUs", {"devices": n, "sharding": "fsdp"}))
        out = []
        for text, changes in options:
            peak = self.replan(**changes).peak
            if peak < self.peak * 0.99:
                out.append(f"{text}: peak {format_bytes(peak)}{' per GPU' if 'devices' in changes else ''}")
        weights = format_bytes(self.quantized_weights)
        return out or [f"nothing simple fits {format_bytes(budget_bytes)}: the 4-bit weights alone need {weights}"]

    def format_table(self, measured_peak: int | None = None) -> str:
        """A table like the QLoRA paper's memory breakdown (GiB; MiB below 1 GiB), with the measured peak if given."""
        s = self.settings
        paged = " (paged: CUDA managed memory)" if self.paged_optimizer_states else ""
        gc_on = "on" if s["gradient_checkpointing"] else "off"
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", MIB)
        lines = [
            f"{s['model']}: {_count(s['params'])} params, batch {s['batch_size']} x {s['seq_len']}, "
            f"{s['devices']} device(s){' ' + s['sharding'] if s['devices'] > 1 else ''}, checkpointing {gc_on}",
            "",
            ("part", unit, "detail"),
            (
                "4-bit base weights",
                self.quantized_weights,
                f"{_count(self.quantized_params)} params, "
                f"{self.bits_per_quantized_param:.3f} bits/param ({s['quant']})",
            ),
            ("unquantized params", self.unquantized_weights, f"{s['unquantized']} in {s['dtype']}"),
            (
                "LoRA adapters",
                self.adapters,
                f"{self.adapter_params / 1e6:.1f}M params, r={s['r']}, {s['lora_layers']} layers, {s['adapter_dtype']}",
            ),
            ("adapter gradients", self.gradients, "alive from backward to the optimizer step"),
            ("optimizer states", self.optimizer_states, f"{s['optimizer']}{paged}"),
            ("activations, checkpointing on", self.activations_with_checkpointing, "at the step's peak"),
            ("activations, checkpointing off", self.activations_without_checkpointing, "at the step's peak"),
            ("overhead", self.overhead, "workspaces; FSDP gathered layers / DDP gradient buckets"),
            None,
            ("predicted peak", self.peak, "device allocator (torch.cuda.max_memory_allocated)"),
        ]
        if self.paged_optimizer_states:
            lines.append(("with paged states", self.total, "device-wide when nothing is paged out"))
        if measured_peak is not None:
            ratio = self.peak / measured_peak if measured_peak else float("nan")
            lines.append(("measured peak", measured_peak, f"predicted / measured = {ratio:.3f}"))
        width = 32
        out = []
        for row in lines:
            if row is None:
                out.append("-" * (width + 60))
            elif isinstance(row, str):
                out.append(row)
            else:
                label, value, detail = row
                number = value if isinstance(value, str) else f"{value / scale:8.2f}"
                out.append(f"{label.ljust(width)}{number.rjust(8)}  {detail}")
        return "\n".join(out)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


_META_MODELS: dict[str, nn.Module] = {}


def _meta_model(config: Any, trust_remote_code: bool) -> nn.Module:
    """The model built on the ``meta`` device (no memory), cached per config (the advice re-plans often)."""
    from transformers import AutoModelForCausalLM

    key = f"{trust_remote_code}:{config.to_json_string()}"
    if key not in _META_MODELS:
        if len(_META_MODELS) > 8:
            _META_MODELS.clear()
        with torch.device("meta"):
            _META_MODELS[key] = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return _META_MODELS[key]


def plan_memory(
    model: Any,
    batch_size: int = 1,
    seq_len: int = 2048,
    lora: LoRAConfig | None = None,
    quantization: QuantizationConfig | None = None,
    quantize: bool = True,
    optimizer: str = "paged_adamw_32bit",
    gradient_checkpointing: bool = True,
    dtype: DTypeLike = "bf16",
    devices: int = 1,
    sharding: Literal["ddp", "fsdp"] = "ddp",
    loss_chunk_size: int | None = 4096,
    device_type: str = "cuda",
    trust_remote_code: bool = False,
    preference: str | None = None,
) -> MemoryPlan:
    """Predict the memory of one QLoRA training step of a causal LM on each device.

    Args:
        model: a transformers config: ``PretrainedConfig``, dict with ``model_type``, a model directory or a
            config ``.json`` (only the config is read; see :func:`lightning_qlora.models.sources.load_config`).
        batch_size: sequences per step per device.
        seq_len: tokens per sequence.
        lora: adapter settings (default ``LoRAConfig()``: r=64 on all linear layers, fp32 master weights).
        quantization: 4-bit settings (default ``QuantizationConfig()``: NF4 + double quantization, blocks of 64).
        quantize: ``False`` plans a base kept entirely in ``dtype`` (LoRA without 4 bits).
        optimizer: a name from :data:`lightning_qlora.optim.paged.OPTIMIZERS`, or ``adamw`` (torch).
        gradient_checkpointing: whether each decoder layer is recomputed in backward.
        dtype: dtype of the unquantized parameters and of the residual stream.
        devices: number of GPUs.
        sharding: ``ddp`` (a full replica per GPU plus gradient buckets) or ``fsdp`` (weights, adapters, gradients
            and optimizer states divided by ``devices``, plus two gathered layers).
        loss_chunk_size: tokens per chunk of :func:`lightning_qlora.models.losses.chunked_cross_entropy` (``CausalLM``'s
            default 4096); ``None``: transformers' own loss, which keeps fp32 logits of the whole batch.
        device_type: ``cuda`` adds allocator workspaces; ``cpu`` does not (for checks against CPU measurements).
        trust_remote_code: allow model code from the checkpoint when building the meta model.
        preference: ``dpo``, ``ipo`` or ``orpo`` plans a :class:`~lightning_qlora.PreferenceLM` step (sequence scores,
            and for DPO/IPO the reference forward of the same base); ``batch_size`` then counts chosen and
            rejected sequences (2 per pair).

    Returns:
        The :class:`MemoryPlan`.

    Raises:
        ValueError: for a batch, sequence or device count below 1, an unknown sharding or optimizer.
    """
    from lightning_qlora.models.sources import load_config

    arguments = {k: v for k, v in locals().items() if k != "load_config"}
    if batch_size < 1 or seq_len < 1 or devices < 1:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}, devices={devices} must all be >= 1")
    if sharding not in ("ddp", "fsdp"):
        raise ValueError(f"sharding={sharding!r} is not supported; use 'ddp' or 'fsdp'")
    lora = lora or LoRAConfig()
    quantization = (quantization or QuantizationConfig()) if quantize else None
    arguments["lora"] = lora
    config = load_config(model, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype = to_dtype(dtype)
    e = dtype.itemsize
    net = _meta_model(config, trust_remote_code)

    # ---- parameters, exactly: linear-like layers and expert stacks as the loader quantizes them
    q_params = q_bytes = largest = 0
    quantized: set[int] = set()
    linears = dict(shell_candidates(net, quantization)) if quantization else {}
    stacks = quantized_stacks(net, quantization)
    for module in linears.values():
        n = module.weight.numel()
        q_params, q_bytes, largest = q_params + n, q_bytes + quantized_bytes(n, quantization), max(largest, n)
        quantized.add(id(module.weight))
    for param in stacks:
        n = param.numel()
        q_params, q_bytes = q_params + n, q_bytes + quantized_bytes(n, quantization)
        largest = max(largest, n // param.shape[0])  # one expert is dequantized at a time
        quantized.add(id(param))
    q_bytes += code_table_bytes(quantization) if quantization else 0
    u_bytes = sum(p.numel() * e for p in net.parameters() if id(p) not in quantized)
    n_params = sum(p.numel() for p in net.parameters())
    targets = find_lora_targets(net, lora)
    shapes = [(t, *linear_shape(net.get_submodule(t))) for t in targets]
    a_item = to_dtype(lora.dtype).itemsize
    numels = [n for _, i, o in shapes for n in (lora.r * i, lora.r * o)]
    numels += [lora.r * p.shape[0] * (p.shape[1] + p.shape[2]) for p in quantized_stacks(net, QuantizationConfig())]
    a_params = sum(numels)
    a_bytes = a_params * a_item
    opt_bytes, paged = optimizer_bytes(numels, optimizer, to_dtype(lora.dtype))
    if device_type != "cuda":
        paged = 0

    # ---- activations, phase by phase (see lightning_qlora.memory.activations)
    c = (quantization.compute_dtype if quantization else dtype).itemsize  # bytes of the autocast (compute) dtype
    phases = activation_phases(net, text, lora, shapes, batch_size=batch_size, seq_len=seq_len, act=e, compute=c,
                               master=a_item, adapter_params=a_params, adapter_bytes=a_bytes, largest=largest,
                               loss_chunk_size=loss_chunk_size, preference=preference)  # fmt: skip
    layers = text.num_hidden_layers

    # ---- per device
    shard = devices if sharding == "fsdp" and devices > 1 else 1
    weights = (q_bytes + u_bytes + a_bytes) // shard
    grads = a_bytes // shard
    states, paged = opt_bytes // shard, paged // shard
    overhead = CUDA_WORKSPACE_BYTES if device_type == "cuda" else 0
    if shard > 1:  # one layer gathered for compute plus the next one prefetched
        overhead += 2 * (q_bytes + a_bytes) // max(layers, 1)
    elif devices > 1:  # DDP's gradient buckets hold a second copy of the gradients
        overhead += grads
    resident = weights + states - paged
    static = resident + overhead

    def peak_of(checkpointing: bool) -> tuple[int, int]:
        """(largest activation bytes, largest activations + gradients) over the phases of the step."""
        steps = phases[checkpointing]
        return max(a for a, _ in steps), max(a + g // shard for a, g in steps)

    act_on, step_on = peak_of(True)
    act_off, step_off = peak_of(False)
    act, step = (act_on, step_on) if gradient_checkpointing else (act_off, step_off)
    step_phases = {k: a + g // shard for k, (a, g) in zip(PHASES, phases[gradient_checkpointing])}
    peak = static + max(step, grads)  # the optimizer step holds every gradient
    name = getattr(config, "_name_or_path", "") or f"{getattr(config, 'model_type', 'model')}"
    settings = {
        "model": name or "model", "params": n_params, "batch_size": batch_size, "seq_len": seq_len,
        "tokens": batch_size * seq_len, "vocab_size": text.vocab_size, "layers": layers, "r": lora.r,
        "lora_layers": len(targets),
        "adapter_dtype": lora.dtype, "optimizer": optimizer, "gradient_checkpointing": gradient_checkpointing,
        "dtype": dtype_name(dtype), "devices": devices, "sharding": sharding,
        "unquantized": unquantized_kinds(net, quantized),
        "quant": "none" if not quantization else
        f"{quantization.quant_type}{' + DQ' if quantization.double_quant else ''}, blocks of {quantization.blocksize}",
        "phases": step_phases, "arguments": arguments,
    }  # fmt: skip
    return MemoryPlan(
        quantized_weights=q_bytes // shard,
        quantized_params=q_params // shard,
        unquantized_weights=u_bytes // shard,
        adapters=a_bytes // shard,
        adapter_params=a_params // shard,
        gradients=grads,
        optimizer_states=states,
        paged_optimizer_states=paged,
        activations=act,
        activations_with_checkpointing=act_on,
        activations_without_checkpointing=act_off,
        overhead=overhead,
        resident=resident,
        peak=peak,
        settings=settings,
    )
