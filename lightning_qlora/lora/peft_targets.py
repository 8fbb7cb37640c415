"""Which ``target_modules`` / ``target_parameters`` make PEFT adapt exactly the layers an adapter was trained on.

PEFT matches a ``target_modules`` list entry against a module's full name or any ``.``-suffix of it, and a string as a
regex over the full name; :func:`peft_target_modules` picks the shortest form that selects exactly the adapted layers.
"""

from __future__ import annotations

import re

from torch import nn

from lightning_qlora.lora.layer import lora_modules


def _peft_matches(key: str, targets: list[str] | str) -> bool:
    """PEFT's ``check_target_module_exists`` for a list (exact or ``.suffix``) or a regex (full match)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def peft_target_modules(model: nn.Module, adapted: list[str]) -> list[str] | str:
    """The shortest ``target_modules`` with which PEFT adapts exactly ``adapted`` among ``model``'s modules.

    Tries the distinct last name components (``["k_proj", "q_proj", ...]``), then the full names, then an anchored
    regex; PEFT matches a list entry against the full name or any ``.``-suffix of it.
    """
    inner = tuple(f"{name}." for name, _ in lora_modules(model))  # base_layer etc.: PEFT sees the plain base model
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inner) and ".lora_experts" not in f".{n}"]
    wanted = set(adapted)
    candidates: list[list[str] | str] = [
        sorted({n.rsplit(".", 1)[-1] for n in adapted}),
        sorted(wanted),
        "|".join(re.escape(n) for n in sorted(wanted)),
    ]
    for targets in candidates:
        if {n for n in names if _peft_matches(n, targets)} == wanted:
            return targets
    return candidates[-1]


V4_EXPERT_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})
"""Leaf names of MoE expert projections before transformers 5 fused them into stacks (see :func:`split_targets`)."""


def split_targets(model: nn.Module, names: list[str], experts: bool) -> tuple[list[str] | str, list[str]]:
    """``(target_modules, target_parameters)`` that make PEFT adapt exactly the linear layers ``names``.

    In a model with adapted expert stacks, peft (0.19 to at least 0.21) reads a ``target_modules`` entry named like a
    transformers-4 expert projection (``gate_proj``, ``up_proj``, ``down_proj``, ``w1``..``w3``) as an adapter for
    the fused stacks: the dense and shared MLP layers of DeepSeek-V3, GLM-4-MoE or ERNIE-4.5-MoE would lose their
    adapters and the stacks' rank would double (peft issue #3711). Those layers go into ``target_parameters`` as
    ``<name>.weight`` instead, which peft adapts with the same tensors under the same keys.
    """
    moved = sorted(n for n in names if experts and n.rsplit(".", 1)[-1] in V4_EXPERT_NAMES)
    kept = [n for n in names if n not in moved]
    modules = peft_target_modules(model, kept) if kept else []
    if not moved:
        return modules, []
    short = peft_target_modules(model, moved)
    return modules, [f"{t}.weight" for t in (sorted(moved) if isinstance(short, str) else short)]


__all__ = ["V4_EXPERT_NAMES", "peft_target_modules", "split_targets"]
