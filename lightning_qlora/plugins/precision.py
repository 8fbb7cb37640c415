"""``NF4Precision``: a Lightning precision plugin that stores the frozen model in 4-bit NF4 with double quantization."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_qlora.memory.footprint import Footprint, measure_footprint
from lightning_qlora.quantization.loading import deferred_4bit_linears, finalize_deferred, mark_full_precision
from lightning_qlora.quantization.nf4 import DEFAULT_SKIP_MODULES, QuantizationConfig
from lightning_qlora.quantization.shells import quantize_model
from lightning_qlora.utils.dtypes import DTypeLike, default_dtype, to_dtype
from lightning_qlora.utils.formatting import format_bytes
from lightning_qlora.utils.imports import bitsandbytes

log = logging.getLogger(__name__)


class NF4Precision(Precision):
    """Quantize every linear layer (but the output head) to NF4 + double quant at setup; compute in bf16.

    Unlike Lightning's ``BitsandbytesPrecision`` this runs on CPU and on CUDA, never quantizes LoRA adapters
    (they are parameters, not ``nn.Linear``), quantizes weights as they are loaded when the model is built under
    ``trainer.init_module()`` or in ``configure_model``, and keeps bitsandbytes' CPU kernels from repacking the
    weights (which would silently break backward after a validation pass).

    Lightning's model summary (``Trainer(enable_model_summary=True)``, plain or rich) would count each packed 4-bit
    weight as half its parameters at 32 bits each; the plugin makes the summary callbacks of the trainer whose model
    it converts report :class:`QuantizedSummary` numbers instead: true parameter counts, bytes by kind.

    Args:
        quant_type: ``"nf4"`` (QLoRA) or ``"fp4"`` (ablation).
        double_quant: quantize the block constants to 8 bits (≈4.127 instead of 4.5 bits per parameter).
        compute_dtype: dtype of the on-the-fly dequantized weights and of autocast: ``bf16`` (default), ``fp16``,
            or ``fp32`` (slow, warns).
        blocksize: weights per absmax block (64 in the paper).
        quant_storage: dtype the packed 4-bit codes are stored in (``uint8``; the compute dtype for FSDP).
        skip_modules: layer names kept in full precision (default: output heads such as ``lm_head``/``output``).
        autocast: run forward under ``torch.autocast(compute_dtype)`` so LoRA matmuls use it too.
        device: where to quantize (default: the current CUDA device if there is one, else CPU).

    Raises:
        ValueError: for an unknown quant type, dtype or block size.
    """

    precision: Literal["nf4", "fp4", "nf4-dq", "fp4-dq"] = "nf4-dq"

    def __init__(
        self,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: DTypeLike = "bf16",
        blocksize: int = 64,
        quant_storage: DTypeLike = "uint8",
        skip_modules: list[str] | None = None,
        autocast: bool = True,
        device: str | None = None,
    ) -> None:
        dtype = to_dtype(compute_dtype)
        if dtype == torch.float32:
            warnings.warn(
                "NF4Precision(compute_dtype=fp32) dequantizes to fp32 for every matmul: correct but slow; "
                "use bf16 (or fp16 on GPUs without bf16)",
                stacklevel=2,
            )
        self.config = QuantizationConfig(
            quant_type=quant_type,
            double_quant=double_quant,
            blocksize=blocksize,
            compute_dtype=dtype,
            quant_storage=to_dtype(quant_storage),
            skip_modules=tuple(skip_modules) if skip_modules is not None else DEFAULT_SKIP_MODULES,
        )
        self.precision = f"{quant_type}-dq" if double_quant else quant_type  # type: ignore[assignment]
        self.autocast = autocast and dtype != torch.float32
        self.device = torch.device(device) if device is not None else None
        self.footprint: Footprint | None = None
        self.quantized_names: list[str] = []
        import_bitsandbytes_quietly()

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize ``module``'s linear layers in place (idempotent) and record the footprint."""
        mark_full_precision(module, self.config.skip_modules)
        finalize_deferred(module)
        self.quantized_names += quantize_model(module, self.config, self.device)  # ends with guard_cpu_repack
        self.footprint = measure_footprint(module)
        rank_zero_info(f"NF4Precision: {self.footprint.summary()}")
        trainer = getattr(module, "_trainer", None)  # a LightningModule attached to a Trainer
        if isinstance(trainer, pl.Trainer):
            show_true_sizes(trainer.callbacks)
        return module

    @override
    def module_init_context(self) -> contextlib.AbstractContextManager:
        """Build linear layers as empty 4-bit shells (quantized as weights are loaded) and the rest in compute dtype."""
        stack = contextlib.ExitStack()
        stack.enter_context(default_dtype(self.config.compute_dtype))
        stack.enter_context(deferred_4bit_linears(self.config))
        return stack

    @override
    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        """Same as :meth:`module_init_context`: the Trainer's ``init_module()`` only enters this one."""
        return self.module_init_context()

    @override
    def forward_context(self) -> contextlib.AbstractContextManager:
        """Autocast to the compute dtype on every device type in use, so adapters compute in it too."""
        if not self.autocast:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cpu", dtype=self.config.compute_dtype))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", dtype=self.config.compute_dtype))
        return stack

    @override
    def state_dict(self) -> dict[str, Any]:
        """The quantization settings, stored in checkpoints so a resume can check them."""
        return {"quantization": self.config.describe()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint written under different quantization settings."""
        saved = state_dict.get("quantization")
        if saved is not None and saved != self.config.describe():
            raise ValueError(
                f"checkpoint was trained with quantization {saved} but NF4Precision is configured as "
                f"{self.config.describe()}; use the same plugin settings to resume"
            )


class QuantizedSummary(ModelSummary):
    """Lightning's model summary with what a 4-bit model really holds.

    Lightning counts the elements of each parameter and prices them at the trainer's precision: a packed 4-bit
    weight (two codes per byte) counts as half its parameters, and ``"nf4-dq"`` is no precision it knows, so it
    warns and prices every element at 32 bits. Here an ``out x in`` 4-bit weight counts ``out * in`` parameters and
    the size (``model_size``, in MB of 10^6 bytes like Lightning's) is the bytes :func:`measure_footprint` counts:
    4-bit codes with their constants, unquantized parameters, adapters.

    Args:
        model: the LightningModule.
        max_depth: layer nesting shown in the table, as for Lightning's summary.
    """

    def __init__(self, model: pl.LightningModule, max_depth: int = 1) -> None:
        self.footprint = measure_footprint(model)
        """Bytes by kind of tensor of the whole model."""
        with warnings.catch_warnings():  # the size is computed here, not from the precision name
            warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
            super().__init__(model, max_depth=max_depth)

    @property
    @override
    def param_nums(self) -> list[int]:
        return [true_param_count(layer._module) for layer in self._layer_summary.values()]

    @property
    @override
    def total_parameters(self) -> int:
        fp = self.footprint
        return fp.quantized_params + fp.unquantized_params + fp.adapter_params

    @property
    @override
    def model_size(self) -> float:
        return self.footprint.total_bytes * 1e-6

    def kind_lines(self) -> list[str]:
        """Parameters and bytes by kind, in the layout of Lightning's totals (count, then label)."""
        fp = self.footprint
        rows = [
            (
                fp.quantized_params,
                f"4-bit base params: {format_bytes(fp.quantized_bytes)} "
                f"({fp.bits_per_quantized_param:.3f} bits/param, constants included)",
            ),
            (fp.unquantized_params, f"Unquantized params: {format_bytes(fp.unquantized_bytes)}"),
            (fp.adapter_params, f"Adapter params (trainable): {format_bytes(fp.adapter_bytes)}"),
            (self.total_parameters, f"Total params: {format_bytes(fp.total_bytes)} (= {self.model_size:,.3f} MB)"),
        ]
        return [f"{get_human_readable_count(count):<10}{label}" for count, label in rows]


def true_param_count(module: nn.Module) -> int:
    """Parameters of ``module`` with each 4-bit weight counted as ``out_features * in_features`` (shared once)."""
    footprint = measure_footprint(module)
    return footprint.quantized_params + footprint.unquantized_params + footprint.adapter_params


def show_true_sizes(callbacks: list[pl.Callback]) -> None:
    """Make Lightning's model summary callbacks among ``callbacks`` build a :class:`QuantizedSummary`.

    Only callbacks that build Lightning's own summary are changed (per instance, once): the table then shows true
    parameter counts and size, followed by the bytes by kind. Subclasses with their own summary are left alone.
    """
    for callback in callbacks:
        stock = getattr(type(callback), "_summary", None) is ModelSummaryCallback._summary
        if isinstance(callback, ModelSummaryCallback) and stock and "_summary" not in vars(callback):
            _use_quantized_summary(callback)


def _use_quantized_summary(callback: ModelSummaryCallback) -> None:
    built: list[QuantizedSummary] = []
    print_table: Callable[..., None] = callback.summarize

    def summary(trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizedSummary:
        built[:] = [QuantizedSummary(pl_module, max_depth=callback._max_depth)]
        return built[0]

    def summarize(*args: Any, **kwargs: Any) -> None:
        print_table(*args, **kwargs)
        if built:
            rank_zero_info("\n".join(["Model footprint (NF4Precision):", *built[0].kind_lines()]))

    callback._summary = summary  # type: ignore[method-assign]
    callback.summarize = summarize  # type: ignore[method-assign]


_BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropHubKernelProbe(logging.Filter):
    """Drops bitsandbytes' note that its optional CPU hub kernel could not be loaded.

    bitsandbytes tries ``kernels-community/quantization-bitsandbytes`` (a hub download) when it is imported on a CPU
    with AVX512-BF16 and logs a warning when that fails (offline, or without the ``kernels`` package). That kernel
    serves only the CPU inference layout, which ``NF4Linear`` never uses, so nothing the user could do about
    the message would change a run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


@contextlib.contextmanager
def _quiet_hub_kernel_probe() -> Iterator[None]:
    logger = logging.getLogger(_BNB_CPU_KERNEL_LOGGER)
    drop = _DropHubKernelProbe()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def import_bitsandbytes_quietly() -> None:
    """Import bitsandbytes (once) without its note about the optional CPU hub kernel (see :class:`_DropHubKernelProbe`).

    Only that one record, of that one logger, during this import, is dropped.
    """
    with _quiet_hub_kernel_probe():
        bitsandbytes()
