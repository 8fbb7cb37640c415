"""Lightning's model summary with what a 4-bit model really holds (installed by ``NF4Precision`` on the trainer)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_qlora.memory.footprint import measure_footprint
from lightning_qlora.utils.formatting import format_bytes


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
