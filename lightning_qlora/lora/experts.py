"""LoRA on mixture-of-experts stacks: one ``(A, B)`` pair per expert, in the layout peft's ``target_parameters`` uses.

For a stack of ``E`` experts whose matmul maps ``in → out``: ``lora_A`` is ``(E·r) × in`` (expert-major: rows
``e·r … e·r+r-1`` are expert ``e``'s A) and ``lora_B`` is ``out × (r·E)`` (column ``k·E + e`` is rank ``k`` of expert
``e``), exactly peft's ``ParamWrapper``; expert ``e``'s update is ``(α/r)·x·Aₑᵀ·Bₑᵀ``. B starts at zero. peft's
wrapper has no dropout on experts, so neither has this one. The experts forward
(:func:`lightning_qlora.quantization.experts.experts_forward`) calls the pair of each projection it runs.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch import nn

from lightning_qlora.lora.layer import LoRAConfig, lora_scaling
from lightning_qlora.quantization.experts import (
    DENSE_EXPERTS,
    expert_stacks,
    is_experts_module,
    stack_is_transposed,
    stack_names,
    stack_shape,
    use_experts_forward,
    uses_experts_interface,
)
from lightning_qlora.quantization.nf4 import is_skipped
from lightning_qlora.utils.dtypes import to_dtype


class ExpertLoRA(nn.Module):
    """The adapters of one expert stack.

    Args:
        experts: number of experts ``E``.
        in_features: input size of each expert's matmul.
        out_features: output size of each expert's matmul.
        r: rank per expert.
        alpha: scale numerator.
        use_rslora: scale by ``alpha / sqrt(r)``.
        dtype: master-weight dtype.
        device: where the adapters live.
    """

    def __init__(
        self,
        experts: int,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.experts, self.r, self.alpha = experts, r, alpha
        self.in_features, self.out_features = in_features, out_features
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.disabled = False
        """While True (see :func:`~lightning_qlora.lora.layer.adapters_disabled`) the update is zero."""
        self.lora_A = nn.Parameter(torch.empty(experts * r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r * experts, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft initialise A

    def pair(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s ``(A: r × in, B: out × r)``."""
        a = self.lora_A.view(self.experts, self.r, self.in_features)[expert]
        b = self.lora_B.view(self.out_features, self.r, self.experts)[:, :, expert]
        return a, b

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``(α/r)·x·Aₑᵀ·Bₑᵀ`` in ``x``'s dtype (the adapters are cast, as the linear path does under autocast)."""
        if self.disabled:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        a, b = self.pair(expert)
        return (x @ a.t().to(x.dtype)) @ b.t().to(x.dtype) * self.scaling


def inject_expert_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Give every expert stack of ``model`` an :class:`ExpertLoRA` (in place, idempotent); returns the new stacks.

    Stacks under ``config.exclude_modules`` are left alone. Names are ``<experts module>.<stack>``.

    Experts modules transformers does not dispatch through its experts interface get no adapter (one warning).
    """
    dtype = to_dtype(config.dtype)
    added = []
    unsupported = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if is_experts_module(m) and not uses_experts_interface(m) and not is_skipped(n, config.exclude_modules)
    ]
    if unsupported:  # full-precision experts outside transformers' experts interface: the rest still trains
        warnings.warn(
            f"LoRA: no adapters on {len(unsupported)} experts modules that transformers does not dispatch through "
            f"its experts interface (e.g. {unsupported[0]}); their experts stay frozen",
            stacklevel=2,
        )
    for name, module in expert_stacks(model, skip=config.exclude_modules, strict=False):
        adapters = getattr(module, "lora_experts", None)
        if adapters is None:
            adapters = nn.ModuleDict()
            module.lora_experts = adapters
        for stack in stack_names(module):
            full = f"{name}.{stack}"
            excluded = is_skipped(full, config.exclude_modules) or is_skipped(name, config.exclude_modules)
            if stack in adapters or excluded or not _targets_stack(config, name, stack):
                continue
            experts, a, b = stack_shape(getattr(module, stack))
            in_features, out_features = (a, b) if stack_is_transposed(module) else (b, a)
            device = getattr(module, stack).device
            adapters[stack] = ExpertLoRA(experts, in_features, out_features, config.r, config.alpha,
                                         config.use_rslora, dtype, device)  # fmt: skip
            added.append(full)
    if added:
        use_experts_forward(model)
    return added


def expert_lora_modules(model: nn.Module) -> list[tuple[str, ExpertLoRA]]:
    """``(<experts module>.<stack>, ExpertLoRA)`` for every adapted stack of ``model``."""
    out = []
    for name, module in model.named_modules():
        adapters = getattr(module, "lora_experts", None)
        if isinstance(adapters, nn.ModuleDict):
            out += [(f"{name}.{stack}", lora) for stack, lora in adapters.items()]
    return out


def _targets_stack(config: LoRAConfig, module_name: str, stack: str) -> bool:
    """Whether ``config.target_modules`` asks for an adapter on the stack ``<module_name>.<stack>``."""
    target, full = config.target_modules, f"{module_name}.{stack}"
    if target == "all-linear":
        return True
    if isinstance(target, str):
        return re.fullmatch(target, full) is not None or re.fullmatch(target, module_name) is not None
    return is_skipped(full, list(target)) or is_skipped(module_name, list(target))


def _peft_swaps(module: nn.Module) -> bool:
    """Whether peft reads this stack the other way round.

    A dense layout is stored in × out, but its module carries no ``is_transposed`` flag in a plain transformers
    model, so peft takes it for out × in.
    """
    return type(module).__name__ in DENSE_EXPERTS


def _peft_layout(
    module: nn.Module, a: torch.Tensor, b: torch.Tensor, experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our ``(A: E·r × in, B: out × r·E)`` as peft stores the same update (``ΔWₑ = Aₑᵀ·Bₑᵀ`` either way), and back.

    Where peft reads the stack the other way round, its ``A`` is our ``B`` per expert transposed and vice versa: the
    same swap maps peft's pair back to ours, so this one function serves export and import.
    """
    if not _peft_swaps(module):
        return a, b
    rank, a_cols, b_rows = a.shape[0] // experts, a.shape[1], b.shape[0]
    swapped_a = b.reshape(b_rows, rank, experts).permute(2, 1, 0).reshape(experts * rank, b_rows)
    swapped_b = a.reshape(experts, rank, a_cols).permute(2, 1, 0).reshape(a_cols, rank * experts)
    return swapped_a, swapped_b


def unwrap_peft_key(key: str) -> tuple[str, int]:
    """A peft module key without the ``.base_layer`` suffixes of nested parameter wrappers, and how many there were."""
    depth = 0
    while key.endswith(".base_layer"):
        key, depth = key.removesuffix(".base_layer"), depth + 1
    return key, depth


def peft_expert_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapted expert stacks as peft saves them, and the ``target_parameters`` that select exactly those.

    peft wraps each targeted parameter of a module in a ``ParamWrapper``, the first one (in the module's parameter
    order) innermost: with ``k`` stacks, stack ``i`` (0-based) is ``<module>`` + ``.base_layer`` × ``(k-1-i)``.

    Returns:
        ``({"<module>[.base_layer...].lora_A.weight": tensor, ...}, target_parameters)``.
    """
    tensors: dict[str, torch.Tensor] = {}
    adapted, all_stacks = [], []
    for name, module in model.named_modules():
        adapters = getattr(module, "lora_experts", None)
        if not isinstance(adapters, nn.ModuleDict):
            continue
        stacks = [s for s in stack_names(module) if s in adapters]
        all_stacks += [f"{name}.{s}" for s in stack_names(module)]
        for i, stack in enumerate(stacks):
            key = name + ".base_layer" * (len(stacks) - 1 - i)
            lora = adapters[stack]
            a, b = _peft_layout(module, lora.lora_A.detach(), lora.lora_B.detach(), lora.experts)
            tensors[f"{key}.lora_A.weight"] = a.to("cpu").contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to("cpu").contiguous()
            adapted.append(f"{name}.{stack}")
    short = sorted({".".join(n.split(".")[-2:]) for n in adapted})
    picks = {n for n in all_stacks if any(n == s or n.endswith(f".{s}") for s in short)}
    return tensors, (short if picks == set(adapted) else sorted(adapted))


def load_peft_experts(
    model: nn.Module, groups: dict[str, dict[str, torch.Tensor]], targets: list[str], config: LoRAConfig, path: str
) -> None:
    """Load the expert pairs of a peft adapter (see :func:`peft_expert_tensors`) into ``model``, injecting adapters.

    Args:
        model: the Hugging Face model root.
        groups: ``{"<module>[.base_layer...]": {"A": tensor, "B": tensor}}`` naming experts modules.
        targets: the adapter's ``target_parameters``.
        config: alpha, rsLoRA and dtype of the adapters to create.
        path: the weights file (for messages).

    Raises:
        ValueError: for a key that names no adapted stack or tensors that do not fit it.
    """
    modules = dict(model.named_modules())
    for key, pair in groups.items():
        name, depth = unwrap_peft_key(key)
        module = modules.get(name)
        stacks = [
            s for s in (stack_names(module) if module is not None else [])
            if any(f"{name}.{s}" == t or f"{name}.{s}".endswith(f".{t}") for t in targets)
        ]  # fmt: skip
        if module is None or depth >= len(stacks):
            raise ValueError(f"{path}: {key} names no expert stack of {type(model).__name__}; wrong base model")
        stack = stacks[len(stacks) - 1 - depth]
        experts, a_dim, b_dim = stack_shape(getattr(module, stack))
        in_features, out_features = (a_dim, b_dim) if stack_is_transposed(module) else (b_dim, a_dim)
        a, b = _peft_layout(module, pair["A"], pair["B"], experts)
        if a.shape[0] % experts or a.shape[1] != in_features or b.shape[0] != out_features:
            raise ValueError(
                f"{path}: {name}.{stack} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} but the stack is "
                f"{experts} experts of {out_features}x{in_features}; this is an adapter for a different base model"
            )
        adapters = getattr(module, "lora_experts", None)
        if adapters is None:
            adapters = nn.ModuleDict()
            module.lora_experts = adapters
        lora = ExpertLoRA(experts, in_features, out_features, a.shape[0] // experts, config.alpha, config.use_rslora,
                          to_dtype(config.dtype), getattr(module, stack).device)  # fmt: skip
        with torch.no_grad():
            lora.lora_A.copy_(a.to(lora.lora_A.dtype))
            lora.lora_B.copy_(b.to(lora.lora_B.dtype))
        adapters[stack] = lora
    use_experts_forward(model)
