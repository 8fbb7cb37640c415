"""NF4 + double quantization of linear layers with bitsandbytes storage.

W (out × in) is cut into blocks of ``blocksize`` values; each block stores 4-bit codes into the NF4 table and one
absmax constant; with double quantization the fp32 constants are themselves quantized to 8 bits in blocks of 256
(≈ 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per parameter). The bits are bitsandbytes' own, so checkpoints stay
interchangeable with HF/peft.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_qlora.utils.dtypes import DTypeLike, default_dtype, dtype_name, to_dtype
from lightning_qlora.utils.imports import bitsandbytes

DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head", "output", "embed_out", "score", "classifier")


@dataclass
class QuantizationConfig:
    """What the frozen base weights are stored as."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NormalFloat (the QLoRA default) or plain FP4 (for ablations)."""
    double_quant: bool = True
    """Quantize the per-block absmax constants to 8 bits in blocks of 256 (saves ≈0.37 bits/param)."""
    blocksize: int = 64
    """Number of weights that share one absmax constant."""
    compute_dtype: torch.dtype = torch.bfloat16
    """Dtype the weights are dequantized to for each matmul."""
    quant_storage: torch.dtype = torch.uint8
    """Dtype the packed codes are stored in; set it to the compute dtype for FSDP sharding."""
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES
    """Module names (last name component, full dotted name, or regex) kept in full precision."""
    skip_tied: bool = True
    """Also keep any linear whose weight is tied to an embedding (the usual output head) unquantized."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Reserved for forward-compatible options; recorded in checkpoint fingerprints."""

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; use 'nf4' or 'fp4'")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize={self.blocksize} is not supported; use a power of 2 in 32..4096")
        self.compute_dtype = to_dtype(self.compute_dtype)
        self.quant_storage = to_dtype(self.quant_storage)
        self.skip_modules = tuple(self.skip_modules)

    def describe(self) -> dict[str, Any]:
        """Plain-data summary (used in fingerprints, logs and checkpoints)."""
        return {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": self.blocksize,
            "compute_dtype": dtype_name(self.compute_dtype),
            "quant_storage": dtype_name(self.quant_storage),
        }


def is_skipped(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module's dotted ``name`` matches a skip pattern.

    A pattern matches as the last name component, a dotted suffix of whole components (``indexer.weights_proj``),
    the full name, or a regex over the full name.
    """
    last = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if pattern in (name, last) or ("." in pattern and name.endswith(f".{pattern}")):
            return True
        if any(ch in pattern for ch in "*^$[]()|\\+?") and re.fullmatch(pattern, name):
            return True
    return False


def tied_linear_names(model: nn.Module) -> set[str]:
    """Names of linear layers whose weight tensor is shared with an embedding (tied output heads)."""
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.device.type != "meta" and m.weight.data_ptr() in embedding_ptrs
    }


def make_params4bit(data: torch.Tensor, config: QuantizationConfig, device: torch.device | str) -> nn.Parameter:
    """Quantize a full-precision weight onto ``device`` and return a frozen bitsandbytes ``Params4bit``."""
    bnb = bitsandbytes()
    weight = bnb.nn.Params4bit(
        data.detach().to(device="cpu" if data.device.type == "meta" else data.device),
        requires_grad=False,
        blocksize=config.blocksize,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=config.quant_storage,
    )
    with default_dtype(torch.float32):  # bitsandbytes builds its code tables in the default dtype
        weight = weight._quantize(torch.device(device))
    share_code_tables(weight.quant_state)
    return weight


_CODE_TABLES: dict[tuple[str, bytes], torch.Tensor] = {}


def share_code_tables(state: Any) -> None:
    """Make a ``QuantState``'s constant lookup tables one shared copy per device and value.

    bitsandbytes allocates the 16-value NF4 table and the 256-value 8-bit map of the nested state per layer
    (≈1 KiB each) and never mutates them.
    """
    for owner in (state, getattr(state, "state2", None)):
        code = getattr(owner, "code", None)
        if isinstance(code, torch.Tensor):
            key = (str(code.device), code.detach().float().cpu().numpy().tobytes())
            owner.code = _CODE_TABLES.setdefault(key, code)


def nf4_linear_class() -> type:
    """The ``NF4Linear`` class (imported lazily so importing this package does not import bitsandbytes)."""
    from lightning_qlora.quantization.nf4_linear import NF4Linear

    return NF4Linear


def is_4bit_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (ours or anyone's)."""
    return isinstance(module, bitsandbytes().nn.Linear4bit)


def is_packed_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` holds packed codes (a bitsandbytes ``Params4bit``) or integers: storage that never trains."""
    return not param.is_floating_point() or isinstance(param, bitsandbytes().nn.Params4bit)


def ensure_canonical_packing(layer: nn.Module) -> None:
    """See :func:`lightning_qlora.quantization.nf4_linear.ensure_canonical_packing`."""
    from lightning_qlora.quantization.nf4_linear import ensure_canonical_packing as _ensure

    _ensure(layer)


def linear_to_4bit(linear: nn.Linear, config: QuantizationConfig, device: torch.device | str) -> nn.Module:
    """Build an ``NF4Linear`` holding ``linear``'s weight quantized on ``device`` (bias kept in full precision)."""
    cls = nf4_linear_class()
    with torch.device("meta"):
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.quant_storage,
        )
    q.weight = make_params4bit(linear.weight.data, config, device)
    q.weight.module = q
    q.quant_state = q.weight.quant_state
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=linear.bias.requires_grad)
    q.train(linear.training)
    return q


def default_quantization_device(weight: torch.Tensor) -> torch.device:
    """Where a weight should be quantized: its own device, or the current CUDA device for CPU/meta weights."""
    if weight.device.type in ("cpu", "meta") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


def dequantize_codes(codes: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """``codes`` dequantized by bitsandbytes straight into ``dtype`` (fp64: through fp32).

    bitsandbytes' ``dequantize_4bit`` writes the dtype the weights were quantized from: a bf16 checkpoint computed in
    fp32 would be rounded to bf16 first (2⁻⁹ relative) in one path and not in another (its no-grad ``gemm_4bit``
    dequantizes into the input's dtype). Every matmul, merge and reference here dequantizes through this function.
    """
    target = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    if quant_state.dtype != target:
        quant_state = copy.copy(quant_state)  # a shallow copy: the codes and constants are shared, not copied
        quant_state.dtype = target
    return bitsandbytes().functional.dequantize_4bit(codes, quant_state).to(dtype)


def dequantize_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-precision weight a 4-bit (or plain) linear layer computes with, as bitsandbytes dequantizes it."""
    if is_4bit_linear(layer):
        ensure_canonical_packing(layer)
        return dequantize_codes(layer.weight.data, layer.weight.quant_state, dtype)
    return layer.weight.data.to(dtype)


def guard_cpu_repack(model: nn.Module) -> int:
    """Make every 4-bit layer of ``model`` (ours or bitsandbytes' own) keep the canonical layout; returns how many."""
    count = 0
    for module in model.modules():
        if is_4bit_linear(module):
            ensure_canonical_packing(module)
            count += 1
    return count


__all__ = [
    "DEFAULT_SKIP_MODULES",
    "DTypeLike",
    "QuantizationConfig",
    "dequantize_codes",
    "dequantize_weight",
    "default_quantization_device",
    "ensure_canonical_packing",
    "guard_cpu_repack",
    "is_4bit_linear",
    "is_packed_parameter",
    "is_skipped",
    "linear_to_4bit",
    "make_params4bit",
    "nf4_linear_class",
    "tied_linear_names",
]
