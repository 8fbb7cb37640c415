"""Low-rank adapters: ``h = W0·x + (alpha/r)·B·A·dropout(x)`` on frozen (possibly 4-bit) linear layers.

A is Kaiming-uniform, B is zero, so the wrapped model computes exactly what the base model did until B moves.
A and B are plain ``nn.Parameter``s (not ``nn.Linear``), so no quantizer ever mistakes them for base weights.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qlora.lora.dropout import dropout
from lightning_qlora.lora.function import fused_lora_linear
from lightning_qlora.quantization.linear_probe import is_linear_like, stands_in_as_linear
from lightning_qlora.quantization.nf4 import (
    DEFAULT_SKIP_MODULES,
    is_4bit_linear,
    is_packed_parameter,
    is_skipped,
    tied_linear_names,
)
from lightning_qlora.quantization.shells import head_patterns, is_router, linear_shape
from lightning_qlora.utils.dtypes import dtype_name, to_dtype


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on ``B·A·x``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoRAConfig:
    """Where adapters go and how they are shaped (QLoRA paper defaults)."""

    r: int = 64
    """Rank of the update ``B·A``."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.1
    """Dropout on the adapter's input (0.1 for ≤13B, 0.05 for 33B/65B in the paper)."""
    target_modules: str | list[str] = "all-linear"
    """``"all-linear"`` (every linear except the output head), a regex matched against full module names, or a
    list of names matched against the last name component or the full dotted name."""
    exclude_modules: list[str] = field(default_factory=list)
    """Names (last component or full dotted name) or regexes never given an adapter."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    dtype: str = "float32"
    """Dtype of the adapter master weights; the matmuls run in the autocast dtype when autocast is on."""
    head_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_MODULES))
    """Output-head names that ``"all-linear"`` leaves out (tied heads are left out too)."""
    fused: bool = True
    """Train through :mod:`lightning_qlora.lora.function`'s fused nodes (per layer, they keep only ``x``, ``x·Aᵀ``
    and a bit-packed dropout mask, and re-dequantize ``W0`` in backward) while gradients
    are on and the base is a 4-bit or frozen plain linear; ``False`` always uses the plain composition of the base
    layer, dropout and two ``F.linear`` calls."""
    init: str = "zeros"
    """``"zeros"``: A Kaiming-uniform, B = 0 (the update starts at zero); ``"loftq"``: A and B from the truncated SVD
    of each 4-bit base's rounding error ``W − deq(Q)`` (:mod:`~lightning_qlora.lora.loftq`), so the step-0 model is
    closer to the original weights (set by the LoRA callback, which reads ``W`` from the base checkpoint)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r={self.r!r} must be a positive integer (the paper uses 64)")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha={self.alpha!r} must be positive (the paper uses 16)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        if self.init not in ("zeros", "loftq"):
            raise ValueError(f"LoRA init={self.init!r} is not supported; use 'zeros' or 'loftq'")
        self.dtype = dtype_name(to_dtype(self.dtype))

    @property
    def scaling(self) -> float:
        """The factor on ``B·A·x``."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict:
        """Plain-data copy (for checkpoints and exports)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        """The config :meth:`to_dict` wrote (keys this version does not know are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class LoRALinear(nn.Module):
    """A frozen linear layer (plain or 4-bit) plus a trainable low-rank update.

    While gradients are on, the forward runs :func:`~lightning_qlora.lora.function.fused_lora_linear` (the update,
    then base matmul plus update, in two autograd nodes that keep only ``x``, ``x·Aᵀ`` and, with dropout, a
    bit-packed mask) whenever
    the base is a bitsandbytes 4-bit linear or a frozen ``nn.Linear``; otherwise (inference, a trainable or exotic
    base, ``fused=False``) the plain composition :meth:`plain_forward`. Both compute the same function.

    Args:
        base_layer: the frozen linear layer (``nn.Linear`` or a subclass, GPT-2's ``Conv1D``, or bitsandbytes
            ``Linear4bit``/``NF4Linear``).
        r: rank of the update.
        alpha: scale numerator (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter input.
        use_rslora: rank-stabilised scaling.
        dtype: dtype of the master ``lora_A``/``lora_B``.
        fused: allow the fused autograd function (see ``LoRAConfig.fused``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused = fused
        self.disabled = False
        """While True (see :func:`adapters_disabled`) the layer is its frozen base: ``W0·x + b``."""
        device = _module_device(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform (as ``nn.Linear``), B = 0: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight parameter (packed codes for a 4-bit base), for code that inspects ``.weight``."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def _dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.training else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0·x + b + scaling · B·(A·dropout(x))``: fused while gradients are on (see ``LoRAConfig.fused``)."""
        if self.disabled:
            return self.base_layer(x)
        if self.fused and torch.is_grad_enabled():
            out = fused_lora_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, self._dropout_p())
            if out is not None:
                return out
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused composition: the base layer's own forward, dropout, then two ``F.linear`` calls.

        Dropout draws its mask as the fused path does (:func:`~lightning_qlora.lora.dropout.dropout`), so both
        paths drop the same elements for the same random state.
        """
        result = self.base_layer(x)
        p = self._dropout_p()
        lora_x = dropout(x, p)[0] if p > 0 else x
        if not torch.is_autocast_enabled(x.device.type):
            lora_x = lora_x.to(self.lora_A.dtype)
        update = F.linear(F.linear(lora_x, self.lora_A), self.lora_B) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling · B·A``, the change to ``W0`` that merging applies."""
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        """Shapes and scale, shown by ``print(model)``."""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, fused={self.fused}"


def _module_device(module: nn.Module) -> torch.device:
    """Where the adapter of ``module`` lives: its (future) weight device, never meta."""
    target = getattr(module, "target_device", None)  # an empty quantize-on-load shell knows where it will live
    if target is not None:
        return torch.device(target)
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "meta" else torch.get_default_device()
    return torch.get_default_device()


def _is_adaptable(name: str, module: nn.Module) -> bool:
    """A linear-like layer whose forward is the linear map: not a router that post-processes its logits."""
    if not (is_linear_like(module) or is_4bit_linear(module)):
        return False
    return type(module) is nn.Linear or not is_router(name, module)


def find_lora_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the linear layers ``config`` puts adapters on.

    Raises:
        ValueError: if the model has no linear layer, or the targets match none of them.
    """
    linears = [n for n, m in model.named_modules() if _is_adaptable(n, m) and ".base_layer" not in f".{n}"]
    linears = [n for n in linears if stands_in_as_linear(model, n, model.get_submodule(n))]
    linears = [n for n in linears if not isinstance(model.get_submodule(n), LoRALinear)]
    if not linears and not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no linear layers; LoRA needs nn.Linear (or 4-bit) layers")
    target = config.target_modules
    if target == "all-linear":
        tied = tied_linear_names(model)
        head, names = head_patterns(model, config.head_modules)
        chosen = [n for n in linears if not is_skipped(n, names) and n not in tied]
        chosen = [n for n in chosen if model.get_submodule(n) is not head]
    elif isinstance(target, str):
        chosen = [n for n in linears if re.fullmatch(target, n)]
    else:
        chosen = [n for n in linears if is_skipped(n, list(target))]
    chosen = [n for n in chosen if not is_skipped(n, config.exclude_modules)]
    already = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not chosen and not already:
        sample = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        raise ValueError(
            f"LoRA target_modules={target!r} (exclude_modules={config.exclude_modules!r}) matches no linear layer; "
            f"available: {sample}"
        )
    return chosen


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap each target linear layer of ``model`` in a :class:`LoRALinear`, in place; idempotent.

    Returns:
        The names of the layers that received an adapter in this call.

    Raises:
        ValueError: if nothing matches (see :func:`find_lora_targets`).
    """
    names = find_lora_targets(model, config)
    dtype = to_dtype(config.dtype)
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora, dtype, fused=config.fused)
        model.set_submodule(name, layer)
    return names


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """All ``(name, LoRALinear)`` pairs in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base inside the block: every LoRA update (linear and expert) is off.

    The 4-bit base with its adapters off is the reference model of preference tuning and the "before" of a
    comparison, with no second copy in memory (peft's ``disable_adapter``, TRL's ``null_ref_context``).

    Args:
        model: a model with LoRA layers (a model without any runs unchanged).
    """
    layers = [module for module in model.modules() if hasattr(module, "disabled") and hasattr(module, "lora_A")]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name is an adapter matrix."""
    return name.endswith(("lora_A", "lora_B"))


def mark_only_lora_trainable(model: nn.Module, trainable_modules: Sequence[str] = ()) -> int:
    """Freeze every parameter except adapters (and those under ``trainable_modules``); returns the trainable count.

    A tied parameter (an output head sharing the input embedding) trains when any of its names is kept:
    ``trainable_modules=["lm_head"]`` on a tied model trains the shared matrix.
    """
    params: dict[int, torch.Tensor] = {}
    keep: dict[int, bool] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name = name.rpartition(".")[0]
        wanted = is_lora_parameter(name) or any(is_skipped(p, trainable_modules) for p in _prefixes(module_name))
        params[id(param)] = param
        keep[id(param)] = keep.get(id(param), False) or wanted
    count = 0
    for key, param in params.items():
        kept = keep[key] and not is_packed_parameter(param)  # 4-bit codes cannot train; a named layer's bias still can
        param.requires_grad_(kept)
        count += param.numel() if kept else 0
    return count


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors of ``model`` by their names in ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if is_lora_parameter(k)}
