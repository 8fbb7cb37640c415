"""``NF4Precision``: a Lightning precision plugin that stores the frozen model in 4-bit NF4 with double quantization."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_qlora.memory.footprint import Footprint, measure_footprint, unrecognised_matrices
from lightning_qlora.plugins.model_summary import show_true_sizes
from lightning_qlora.quantization.loading import deferred_4bit_linears, finalize_deferred, mark_full_precision
from lightning_qlora.quantization.nf4 import DEFAULT_SKIP_MODULES, QuantizationConfig
from lightning_qlora.quantization.shells import quantize_model
from lightning_qlora.utils.dtypes import DTypeLike, default_dtype, dtype_name, to_dtype
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
    it converts report :class:`~lightning_qlora.plugins.model_summary.QuantizedSummary` numbers instead: true
    parameter counts, bytes by kind.

    Args:
        quant_type: ``"nf4"`` (QLoRA) or ``"fp4"`` (ablation).
        double_quant: quantize the block constants to 8 bits (≈4.127 instead of 4.5 bits per parameter).
        compute_dtype: dtype of the on-the-fly dequantized weights and of autocast: ``auto`` (default): bf16
            (the paper's) on GPUs and CPUs that compute it natively, fp16 on GPUs without bf16, fp32 on CPUs that only
            emulate bf16 (about 40× slower there); or ``bf16``, ``fp16``, ``fp32`` (slow on GPUs, warns).
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
        compute_dtype: DTypeLike = "auto",
        blocksize: int = 64,
        quant_storage: DTypeLike = "uint8",
        skip_modules: list[str] | None = None,
        autocast: bool = True,
        device: str | None = None,
    ) -> None:
        dtype = to_dtype(compute_dtype)
        # fp32 is slow only where bf16/fp16 is native: on a CPU that emulates bf16 it is what ``auto`` picks
        if dtype == torch.float32 and str(compute_dtype).lower() != "auto" and to_dtype("auto") != torch.float32:
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
        bitsandbytes()  # imported here, once, so the first step does not pay for it

    def __repr__(self) -> str:
        """``NF4Precision(nf4-dq, compute_dtype=bf16, blocksize=64)``: what it quantizes to and computes in."""
        return (
            f"{type(self).__name__}({self.precision}, compute_dtype={dtype_name(self.config.compute_dtype)}, "
            f"blocksize={self.config.blocksize})"
        )

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize ``module``'s linear layers in place (idempotent) and record the footprint."""
        mark_full_precision(module, self.config.skip_modules)
        finalize_deferred(module)
        self.quantized_names += quantize_model(module, self.config, self.device)  # ends with guard_cpu_repack
        self.footprint = measure_footprint(module)
        rank_zero_info(f"NF4Precision: {self.footprint.summary()}")
        left = unrecognised_matrices(module, self.config.skip_modules)
        if left:  # never a silent full-precision matmul weight
            name, owner = left[0]
            rank_zero_warn(
                f"NF4Precision: {len(left)} weight matrices stay in full precision without adapters "
                f"({100 * self.footprint.matmul_share_4bit:.1f}% of the matmul weights in 4 bits), e.g. {name} of a "
                f"{owner}: it is not a linear layer, Conv1D or an experts module transformers dispatches; see "
                "docs/models.md (If it fails)"
            )
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
