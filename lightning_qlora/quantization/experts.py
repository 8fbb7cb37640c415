"""Mixture-of-experts weights in 4 bits: 3-D expert stacks quantized to NF4 + double quant, dequantized per expert.

transformers 5 stores each MoE layer's experts as fused 3-D parameters (``gate_up_proj`` E × 2I × H, ``down_proj``
E × H × I; GPT-OSS transposed, with biases) and dispatches their forward through its experts interface
(``@use_experts_implementation``). Here each stack is one ``Params4bit`` whose blocks of 64 cut each expert's matrix
exactly as a linear weight is cut (``out·in`` is a multiple of 64), and :func:`experts_forward`, registered with that
interface as ``"lightning_qlora"``, loops over the experts a batch routes to, dequantizes only those, and adds each
expert's LoRA update when the experts module carries adapters (``lora_experts``, see
:mod:`lightning_qlora.lora.experts`). The 4-bit matmul recomputes the dequantized weight in backward instead of
keeping it, as the fused linear path does.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_qlora.quantization.nf4 import QuantizationConfig, dequantize_codes, make_params4bit
from lightning_qlora.utils.imports import bitsandbytes

EXPERTS_IMPLEMENTATION = "lightning_qlora"
"""The name :func:`experts_forward` is registered under in transformers' ``ExpertsInterface``."""

EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
"""The 3-D matmul stacks of an experts module (biases stay full precision)."""


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` holds 3-D expert stacks (``gate_up_proj``/``up_proj``/``down_proj``)."""
    return any(_is_stack(getattr(module, name, None)) for name in EXPERT_PARAMETERS)


def _is_stack(value: Any) -> bool:
    if isinstance(value, bitsandbytes().nn.Params4bit):
        return len(value.quant_state.shape) == 3 if value.quant_state is not None else False
    return isinstance(value, torch.Tensor) and value.dim() == 3


def uses_experts_interface(module: nn.Module) -> bool:
    """Whether ``module``'s experts can run in 4 bits here.

    Either transformers dispatches its forward through its experts interface (the flags it sets), or it is a dense
    layout this module runs itself (:data:`DENSE_EXPERTS`).
    """
    return type(module).__name__ in DENSE_EXPERTS or all(
        hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed")
    )


DENSE_EXPERTS = ("Llama4TextExperts",)
"""Experts modules outside the interface that run every token through every expert (inputs grouped per expert,
``gate_up_proj`` E × H × 2I and ``down_proj`` E × I × H): :func:`dense_experts_forward` runs them one expert at a
time. peft sees these stacks untransposed (it reads no ``is_transposed`` flag on them)."""


def expert_stacks(model: nn.Module, skip: Iterable[str] = (), strict: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every experts module of ``model`` not named in ``skip``.

    Args:
        model: the network.
        skip: name patterns (as ``QuantizationConfig.skip_modules``) of experts modules to leave alone.
        strict: raise for an experts module outside transformers' experts interface (else leave it out).

    Raises:
        ValueError: with ``strict``, for an experts module whose forward does not go through transformers' experts
            interface (its stacks would be read whole by code we do not control), naming the architecture and the
            module type.
    """
    from lightning_qlora.quantization.nf4 import is_skipped

    found = []
    for name, module in model.named_modules():
        if not is_experts_module(module) or is_skipped(name, skip):
            continue
        if not uses_experts_interface(module):
            if not strict:
                continue
            arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ValueError(
                f"{arch}: {name} is a {type(module).__name__} whose forward reads its 3-D expert weights directly "
                "(not through transformers' experts interface), so they cannot be held in 4 bits; pass "
                f"NF4Precision(skip_modules=['{name.rsplit('.', 1)[-1]}']) to keep them in full precision (no adapters "
                "on them)"
            )
        found.append((name, module))
    return found


def stack_names(module: nn.Module) -> list[str]:
    """Names of the 3-D matmul stacks of an experts module, in the order it defines them."""
    return [name for name, p in module.named_parameters(recurse=False) if name in EXPERT_PARAMETERS and _is_stack(p)]


def quantize_stack(tensor: torch.Tensor, config: QuantizationConfig, device: torch.device | str) -> nn.Parameter:
    """One expert stack as a frozen ``Params4bit`` (``quant_state.shape`` keeps the 3-D shape).

    Raises:
        ValueError: when an expert's matrix is not a whole number of blocks (its blocks would straddle experts).
    """
    experts, rows, cols = tensor.shape
    if (rows * cols) % config.blocksize:
        raise ValueError(
            f"an expert matrix of {rows}x{cols} is not a multiple of blocksize={config.blocksize} values, so its "
            "4-bit blocks would straddle two experts; keep these experts in full precision (skip_modules)"
        )
    return make_params4bit(tensor, config, device)


def stack_shape(param: torch.Tensor) -> tuple[int, int, int]:
    """The logical ``(experts, a, b)`` shape of a stack, 4-bit or not."""
    state = getattr(param, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(param.shape)  # type: ignore[return-value]


def expert_weight(param: torch.Tensor, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``expert``'s matrix from a stack, dequantized when it is 4-bit (only that expert's blocks are read)."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return param[expert].to(dtype)
    bnb = bitsandbytes()
    _, rows, cols = state.shape
    count = rows * cols
    absmax = state.absmax
    if state.nested:  # the 8-bit absmax of the whole stack back to fp32 (1/64 of the values: cheap)
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    blocks = count // state.blocksize
    piece = bnb.functional.QuantState(
        absmax=absmax[expert * blocks : (expert + 1) * blocks].float(),
        shape=torch.Size((rows, cols)),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    packed = param.data.reshape(-1).view(torch.uint8)[expert * count // 2 : (expert + 1) * count // 2]
    return dequantize_codes(packed, piece, dtype)


class _ExpertMatmul(torch.autograd.Function):
    """``x @ Wₑᵀ`` (``x @ Wₑ`` for transposed stacks), dequantizing ``Wₑ`` again in backward instead of saving it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, param: torch.Tensor, expert: int, transposed: bool) -> torch.Tensor:
        ctx.param, ctx.expert, ctx.transposed = param, expert, transposed
        weight = expert_weight(param, expert, x.dtype)
        return x @ weight if transposed else x @ weight.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        weight = expert_weight(ctx.param, ctx.expert, grad.dtype)
        return (grad @ weight.t() if ctx.transposed else grad @ weight), None, None, None


def expert_matmul(x: torch.Tensor, param: torch.Tensor, expert: int, transposed: bool) -> torch.Tensor:
    """One expert's projection of ``x``; the stack is frozen (no weight gradient), 4-bit or not."""
    if getattr(param, "quant_state", None) is None and param.requires_grad:
        weight = param[expert]
        return x @ weight if transposed else x @ weight.t()
    return _ExpertMatmul.apply(x, param, expert, transposed)


def _project(module: nn.Module, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
    out = expert_matmul(x, getattr(module, name), expert, module.is_transposed)
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[expert].to(out.dtype)
    adapters = getattr(module, "lora_experts", None)
    if adapters is not None and name in adapters:
        out = out + adapters[name](x, expert).to(out.dtype)
    return out


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """An experts module's forward over 4-bit (or plain) stacks with optional LoRA, one routed expert at a time.

    Same maths as transformers' eager loop: for each expert a token is routed to, ``up`` (gated by the module's own
    ``_apply_gate`` or activation), ``down``, optional post-expert norm, times the routing weight, summed per token.
    """
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for expert in hit:
        if expert >= self.num_experts:  # expert-parallel sentinel
            continue
        top_k_pos, token_idx = torch.where(mask[expert])
        x = hidden_states[token_idx]
        if self.has_gate:
            h = self._apply_gate(_project(self, "gate_up_proj", x, expert))
        else:
            h = self.act_fn(_project(self, "up_proj", x, expert))
        out = _project(self, "down_proj", h, expert)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def quantize_expert_stacks(
    model: nn.Module, config: QuantizationConfig, device: torch.device | str | None = None
) -> list[str]:
    """Quantize the full-precision expert stacks of ``model`` in place (skip list respected); returns their names.

    Raises:
        ValueError: for experts transformers does not dispatch through its experts interface.
    """
    from lightning_qlora.quantization.nf4 import default_quantization_device

    names = []
    for name, module in expert_stacks(model, skip=config.skip_modules):
        for stack in stack_names(module):
            param = getattr(module, stack)
            if getattr(param, "quant_state", None) is not None or param.device.type == "meta":
                continue
            target = device if device is not None else default_quantization_device(param)
            setattr(module, stack, quantize_stack(param.data, config, target))
            names.append(f"{name}.{stack}")
    if names:
        use_experts_forward(model)
    return names


def stack_is_transposed(module: nn.Module) -> bool:
    """Whether an experts module stores its stacks ``in × out`` (GPT-OSS, Llama 4) rather than ``out × in``."""
    return bool(getattr(module, "is_transposed", type(module).__name__ in DENSE_EXPERTS))


def dense_experts_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama 4's experts forward over 4-bit stacks: inputs grouped per expert, each expert dequantized in turn."""
    grouped = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
    outs = []
    for expert in range(self.num_experts):
        gate, up = _project(self, "gate_up_proj", grouped[expert], expert).chunk(2, dim=-1)
        outs.append(_project(self, "down_proj", up * self.act_fn(gate), expert))
    return torch.cat(outs).view(-1, outs[0].shape[-1])


def _run_dense(module: nn.Module) -> None:
    """Give a dense experts module (:data:`DENSE_EXPERTS`) the flags and forward of :func:`dense_experts_forward`."""
    if getattr(module, "_dense_4bit", False):
        return
    module.has_gate, module.has_bias, module.is_transposed, module.is_concatenated = True, False, True, True
    module.forward = types.MethodType(dense_experts_forward, module)  # this instance only; its class is untouched
    module._dense_4bit = True


def register_experts_forward() -> None:
    """Register :func:`experts_forward` with transformers' experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


def use_experts_forward(model: nn.Module) -> int:
    """Route every experts module of ``model`` through :func:`experts_forward`; returns how many there are."""
    stacks = expert_stacks(model, strict=False)
    for _, module in stacks:
        if type(module).__name__ in DENSE_EXPERTS:
            _run_dense(module)
    if any(type(m).__name__ not in DENSE_EXPERTS for _, m in stacks):
        register_experts_forward()
        for config in {id(c): c for c in _configs(model)}.values():
            config._experts_implementation = EXPERTS_IMPLEMENTATION
        for _, module in stacks:
            if hasattr(module, "config"):
                module.config._experts_implementation = EXPERTS_IMPLEMENTATION
    return len(stacks)


def _configs(model: nn.Module) -> list[Any]:
    return [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_experts_implementation")]
