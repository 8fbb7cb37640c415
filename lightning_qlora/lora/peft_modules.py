"""Trained modules outside the adapters (a head, embeddings, norms) as PEFT's ``modules_to_save``, both ways.

peft keeps each module that ``modules_to_save`` names as a trained copy (``ModulesToSaveWrapper``) and saves that
copy's whole state dict under the module's own name: ``base_model.model.<module>.<tensor>`` (the wrapper's
``modules_to_save.<adapter>.`` infix is dropped), in ``adapter_model.safetensors`` beside the LoRA matrices. It picks
the modules by ``module_name.endswith(entry)`` over the base model's module names, LoRA layers already in place. An
input embedding tied to the output head (``tie_word_embeddings``) is kept tied with ``ensure_weight_tying``: the
embedding is listed, the head is tied to its trained copy, and the file holds the tensor under both names.

:func:`saved_modules` finds what a model trained outside its adapters (the LoRA callback's ``trainable_modules``)
and lays it out that way; :func:`plan_saved_modules` checks an adapter's ``modules_to_save`` tensors against a model
before anything is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.lora.layer import LoRALinear, is_lora_parameter
from lightning_qlora.quantization.nf4 import is_packed_parameter

TIE_KEY = "ensure_weight_tying"
"""The ``adapter_config.json`` field with which peft ties the head to the trained copy of the input embedding."""

# the modules peft adds under each adapted layer: a modules_to_save entry must not match them either
_PEFT_LORA_CHILDREN = tuple(
    f".{name}" for base in ("base_layer", "lora_A", "lora_B", "lora_dropout") for name in (base, f"{base}.default")
) + (".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


@dataclass
class SavedModules:
    """What :func:`saved_modules` found: the tensors to write and the ``adapter_config.json`` fields for them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """``{"<module>.<tensor>": tensor}`` (no ``base_model.model.`` prefix), on the CPU, no two sharing memory."""
    modules_to_save: list[str] = field(default_factory=list)
    """The entries with which peft's suffix matching picks exactly these modules."""
    tied: bool = False
    """Whether a trained input embedding is tied to the head (``ensure_weight_tying``)."""


def _under(name: str, modules: list[str]) -> bool:
    """Whether ``name`` is one of ``modules`` or inside one."""
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def _adapter_owners(model: nn.Module) -> set[str]:
    """Names of the modules holding LoRA matrices (``LoRALinear``, expert stacks' adapters)."""
    return {n.rpartition(".")[0] for n, _ in model.named_parameters(remove_duplicate=False) if is_lora_parameter(n)}


def _inside(name: str, owners: set[str], strictly: bool = False) -> str | None:
    """The owner ``name`` is (unless ``strictly``) or is inside, if any."""
    return next((o for o in owners if (name == o and not strictly) or name.startswith(f"{o}.")), None)


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the adapters that require grad, by every name they have; ``{}`` if the base was never frozen.

    A model whose full-precision parameters outside the adapters all require grad was never frozen (a model
    ``inject_lora`` was just called on): nothing in it is told apart as trained.
    """
    params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if not is_lora_parameter(n)]
    if all(p.requires_grad for _, p in params if not is_packed_parameter(p)):
        return {}
    return {n: p for n, p in params if p.requires_grad}


def _whole_modules(model: nn.Module, trained: dict[str, nn.Parameter]) -> list[str]:
    """The largest modules all of whose parameters are trained (no adapter, no frozen tensor inside), sorted.

    Raises:
        ValueError: for a trained parameter inside a LoRA layer, or in a module that also holds frozen ones.
    """
    owners = _adapter_owners(model)
    frozen: dict[str, str] = {}  # module -> a frozen (or adapter) parameter under it
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name not in trained:
            parts = name.split(".")[:-1]
            for i in range(1, len(parts) + 1):
                frozen.setdefault(".".join(parts[:i]), name)
    chosen: set[str] = set()
    for name in trained:
        owner = name.rpartition(".")[0]
        layer = _inside(owner, owners)
        if layer is not None or not owner:
            where = f"the LoRA layer {layer}" if layer is not None else f"{type(model).__name__} itself"
            raise ValueError(
                f"{name} is trained but belongs to {where}, which PEFT's modules_to_save cannot hold; leave it out of "
                "trainable_modules (or out of the LoRA targets) and train again"
            )
        if owner in frozen:
            raise ValueError(
                f"{owner} has trained and frozen parameters ({name} trains, {frozen[owner]} does not); PEFT's "
                f"modules_to_save keeps whole modules: train all of {owner} (a 4-bit weight cannot) or none of it"
            )
        while "." in owner and owner.rpartition(".")[0] not in frozen:  # the largest wholly trained module
            owner = owner.rpartition(".")[0]
        chosen.add(owner)
    return sorted(chosen)


def _peft_names(model: nn.Module) -> set[str]:
    """Module names of ``model`` as peft sees them once its LoRA layers are in place (ours' internals left out)."""
    owners = _adapter_owners(model)
    names = {n for n, _ in model.named_modules(remove_duplicate=False) if n and not _inside(n, owners, strictly=True)}
    layers = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return names | {f"{n}{child}" for n in layers for child in _PEFT_LORA_CHILDREN}


def _entry(module: str, names: set[str]) -> str:
    """The shortest name suffix that peft's ``endswith`` matching resolves to ``module`` alone.

    Raises:
        ValueError: when even the full name matches other modules.
    """
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[i:])
        if {n for n in names if n.endswith(suffix)} == {module}:
            return suffix
    other = sorted(n for n in names if n.endswith(module) and n != module)[0]
    raise ValueError(
        f"{module} is trained, but peft's modules_to_save matches names by suffix and {module!r} also matches "
        f"{other}; rename one of them or leave {module} out of trainable_modules"
    )


def _tied_groups(model: nn.Module, modules: list[str]) -> list[list[str]]:
    """``modules`` grouped by shared parameters (a head tied to the embedding), each group sorted."""
    ids = {m: {id(p) for p in model.get_submodule(m).parameters()} for m in modules}
    groups: list[list[str]] = []
    for module in modules:
        joined = [g for g in groups if any(ids[module] & ids[other] for other in g)]
        merged = sorted({module, *(m for g in joined for m in g)})
        groups = [g for g in groups if g not in joined] + [merged]
    return groups


def _embedding_name(model: nn.Module) -> str | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if getter is not None else None
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, m in model.named_modules() if m is embedding and embedding is not None), None)


def _tied_entry(model: nn.Module, group: list[str]) -> str:
    """The embedding of a trained tied group, when peft can keep the tie (embedding + weight-only tied heads).

    Raises:
        ValueError: for any other sharing of trained weights.
    """
    embedding = _embedding_name(model)
    others = [m for m in group if m != embedding]
    weight = model.get_submodule(embedding).weight if embedding is not None and embedding in group else None
    tied_config = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))

    def weight_only(module: str) -> bool:
        values = list(model.get_submodule(module).state_dict(keep_vars=True).values())
        return len(values) == 1 and values[0] is weight

    if embedding is None or weight is None or not tied_config or not all(weight_only(m) for m in others):
        raise ValueError(
            f"{group[0]} is trained and shares its weights with {', '.join(group[1:])}, which PEFT can keep only for "
            "an input embedding tied to weight-only heads (tie_word_embeddings); untie them or leave them out of "
            "trainable_modules"
        )
    return embedding


def saved_modules_layout(model: nn.Module) -> tuple[list[str], list[str], bool]:
    """``(modules, modules_to_save entries, tied)`` that :func:`saved_modules` writes, without copying a tensor.

    Raises:
        ValueError: as :func:`saved_modules`, for what PEFT cannot represent (the LoRA callback checks at setup).
    """
    modules = _whole_modules(model, trained_parameters(model))
    if not modules:
        return [], [], False
    names = _peft_names(model)
    entries: list[str] = []
    tied = False
    for group in _tied_groups(model, modules):
        if len(group) > 1:
            entries.append(_entry(_tied_entry(model, group), names))
            tied = True
        else:
            entries.append(_entry(group[0], names))
    return modules, entries, tied


def saved_modules(model: nn.Module) -> SavedModules:
    """The modules ``model`` trained outside its adapters, as peft saves ``modules_to_save``.

    Trained means: parameters that require grad outside the LoRA layers, in a model whose base is frozen (as the LoRA
    callback leaves it with ``trainable_modules``, and :func:`~lightning_qlora.lora.loading.load_adapter` after
    loading such an adapter). The largest modules wholly trained are kept, with every tensor of their state dict.
    Tensors sharded by FSDP2 (``DTensor``) are all-gathered: on a sharded model call this on every rank.

    Raises:
        ValueError: one line, for what PEFT cannot represent: a trained tensor inside a LoRA layer or beside frozen
            ones in its module (a 4-bit weight), trained weights shared other than embedding-to-head, or a module
            name that peft's suffix matching cannot single out.
    """
    modules, entries, tied = saved_modules_layout(model)
    if not modules:
        return SavedModules()
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module in modules:
        sub = model.get_submodule(module)
        for key in sub.state_dict():
            owner, _, leaf = key.rpartition(".")
            value = getattr(sub.get_submodule(owner) if owner else sub, leaf).detach()
            if hasattr(value, "full_tensor"):  # an FSDP2 shard (DTensor): all-gathered, a collective
                value = value.full_tensor()
            copy = value.data_ptr() in seen or value.device.type != "cpu"
            seen.add(value.data_ptr())
            tensors[f"{module}.{key}"] = (value.to("cpu", copy=True) if copy else value).contiguous()
    return SavedModules(tensors, sorted(entries), tied)


def plan_saved_modules(
    model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any], adapted: set[str], path: Path
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(tensor of model, value)]`` for an adapter's ``modules_to_save`` tensors, checked; ``model`` is not changed.

    Args:
        model: the Hugging Face model root the adapter is loaded into.
        tensors: the adapter's tensors that are not LoRA matrices, without the ``base_model.model.`` prefix.
        config: the adapter's ``adapter_config.json``.
        adapted: the layers the adapter puts LoRA matrices on.
        path: the weights file, for messages.

    Raises:
        ValueError: one line, for tensors no listed module holds, a listed module's tensor missing or of another
            shape, a listed module holding LoRA layers or 4-bit weights, or a module whose weights this model ties to
            another module that peft would untie (a tie without ``ensure_weight_tying``).
    """
    entries = config.get("modules_to_save") or []
    if tensors and not entries:
        key = next(iter(tensors))
        raise ValueError(
            f"{path} holds {'base_model.model.' + key!r}, which is not a LoRA A/B matrix and its config lists no "
            "modules_to_save (DoRA and embedding adapters are not supported); load it with peft"
        )
    owners = _adapter_owners(model) | adapted
    all_modules = dict(model.named_modules(remove_duplicate=False))
    listed = sorted(
        n for n in all_modules if n and not _inside(n, owners, strictly=True) and any(n.endswith(e) for e in entries)
    )
    for name in listed:
        inner = [a for a in owners if a == name or a.startswith(f"{name}.")]
        if inner:
            raise ValueError(f"{path}: modules_to_save {name} holds the LoRA layer {inner[0]}; load it with peft")
    if config.get(TIE_KEY):  # peft ties the head to the trained embedding copy: every module sharing its weights
        shared = {id(p) for n in listed for p in all_modules[n].parameters()}
        listed += [
            n for n, m in all_modules.items()
            if n and not _under(n, listed) and any(id(p) in shared for p in m.parameters(recurse=False))
        ]  # fmt: skip
    expected = {f"{n}.{k}": v for n in listed for k, v in all_modules[n].state_dict(keep_vars=True).items()}
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(
            f"{path} holds base_model.model.{unknown[0]}, which is neither a LoRA matrix nor a tensor of a module "
            f"{type(model).__name__} has in modules_to_save {entries}; load it onto the model it was trained on"
        )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path} lacks base_model.model.{missing[0]} of its modules_to_save {entries}; re-export it")
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    values: dict[int, torch.Tensor] = {}
    for key, target in expected.items():
        value = tensors[key]
        if is_packed_parameter(target):
            raise ValueError(f"{path}: {key} is a 4-bit weight in this model; load the adapter with peft")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{path}: {key} is {tuple(value.shape)} there and {tuple(target.shape)} here; this is an adapter for "
                "a different base model"
            )
        if id(target) in values and not torch.equal(values[id(target)], value):
            raise ValueError(f"{path}: {key} differs from the tensor it is tied to here; load the adapter with peft")
        values[id(target)] = value
        plan.append((target, value))
    ties = [(n, k) for n, m in all_modules.items() if not _under(n, listed)
            for k, p in m.named_parameters(recurse=False) if id(p) in values]  # fmt: skip
    if ties:
        saved = next(key for key, target in expected.items() if target is getattr(all_modules[ties[0][0]], ties[0][1]))
        raise ValueError(
            f"{path} trains {saved}, which this model ties to {ties[0][0]}.{ties[0][1]}; without {TIE_KEY} peft "
            "unties them, import_peft cannot: load the adapter with peft"
        )
    return plan


def load_saved_modules(plan: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy the values of :func:`plan_saved_modules` into the model; its parameters become trainable (trained ones)."""
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
            if isinstance(target, nn.Parameter):
                target.requires_grad_(True)


__all__ = ["TIE_KEY", "SavedModules", "load_saved_modules", "plan_saved_modules", "saved_modules", "trained_parameters"]
