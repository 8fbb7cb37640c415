"""Activation bytes of mixture-of-experts layers, for the planner: routing, and what each routed token keeps.

Our experts forward (:func:`lightning_qlora.quantization.experts.experts_forward`) runs one expert at a time over the
tokens routed to it. Per (token, expert) pair, autograd keeps: the gathered input (when the first stack has
adapters), the first projection's output (``gate_up``: its gate and up halves are views of it), the activation of
the gate, the product fed to ``down`` (when ``down`` has adapters), each adapter's ``x·Aᵀ``, and the expert output
that is scaled by the routing weight. Per token: the router logits and their fp32 softmax. Per layer: the adapters
cast to the compute dtype, once per expert, when the master weights are in another dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_qlora.quantization.experts import (
    DENSE_EXPERTS,
    expert_stacks,
    stack_is_transposed,
    stack_names,
    stack_shape,
)
from lightning_qlora.quantization.shells import linear_shape

TOP_K_NAMES = ("num_experts_per_tok", "top_k", "moe_topk", "num_experts_per_token", "moe_k")


@dataclass(frozen=True)
class MoELayers:
    """The experts layers of a model, as the planner counts them.

    Attributes:
        layers: how many decoder layers route tokens to experts.
        per_token: activation bytes one token keeps in one such layer (routing and its ``k`` expert passes).
        per_layer: bytes one such layer keeps whatever the token count (adapters cast to the compute dtype).
        shared_inter: intermediate size of a shared dense expert beside the routed ones (0: none).
    """

    layers: int = 0
    per_token: int = 0
    per_layer: int = 0
    shared_inter: int = 0


def plan_moe_layers(
    net: nn.Module, text: Any, adapters: bool, r: int, act: int, compute: int, master: int
) -> MoELayers:
    """Count the experts layers of a (meta) model.

    Args:
        net: the model, usually on the meta device.
        text: its text config (``num_experts_per_tok`` and the like, ``shared_expert_intermediate_size``).
        adapters: whether the expert stacks get adapters (``LoRA`` gives every stack one).
        r: adapter rank.
        act: bytes per element of the residual stream.
        compute: bytes per element of the compute (autocast) dtype.
        master: bytes per element of the adapters' master weights.

    Returns:
        :class:`MoELayers` (all zero for a dense model).
    """
    modules = expert_stacks(net, strict=False)
    if not modules:
        return MoELayers()
    _, module = modules[0]
    names = stack_names(module)
    shapes = {name: stack_shape(getattr(module, name)) for name in names}
    experts = next(iter(shapes.values()))[0]
    transposed = stack_is_transposed(module)
    sizes = {name: ((a, b) if transposed else (b, a)) for name, (_, a, b) in shapes.items()}  # (in, out)
    first = "gate_up_proj" if "gate_up_proj" in sizes else "up_proj"
    hidden, first_out = sizes[first]
    gated = first == "gate_up_proj" or bool(getattr(module, "has_gate", False))
    inter = first_out // 2 if gated else first_out
    clamped = hasattr(module, "limit") and hasattr(module, "alpha")  # GPT-OSS: clamps, sigmoid, (up + 1), glu
    pair = compute * first_out + compute * inter * (5 if clamped else 1)  # first output; the gate's activation
    pair += compute * hidden  # the expert's output, kept by its product with the routing weight
    if adapters:
        pair += act * hidden + compute * inter + compute * r * len(sizes)  # inputs the adapters keep, and x·Aᵀ
    dense = type(module).__name__ in DENSE_EXPERTS  # every token passes every expert (scaled by its score)
    k = experts if dense else next((int(getattr(text, n)) for n in TOP_K_NAMES if getattr(text, n, None)), 1)
    router = (compute + 8) * experts  # logits, fp32 softmax and the top-k weights
    casts = experts * r * sum(i + o for i, o in sizes.values()) * compute if adapters and master != compute else 0
    shared = _shared_inter(net, modules[0][0])
    return MoELayers(layers=len(modules), per_token=router + k * pair, per_layer=casts, shared_inter=shared)


def _shared_inter(net: nn.Module, experts_name: str) -> int:
    """Intermediate size of the dense expert every token also passes (``shared_expert(s)`` beside the experts)."""
    parent = net.get_submodule(experts_name.rpartition(".")[0])
    for child in ("shared_expert", "shared_experts", "shared_mlp"):
        shared = getattr(parent, child, None)
        down = getattr(shared, "down_proj", None) if isinstance(shared, nn.Module) else None
        if down is not None:
            return linear_shape(down)[0]
    return 0
