"""Read and write LoRA adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

Tensor names are PEFT's: ``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r),
with ``<module>`` relative to the Hugging Face model root (``model.layers.0.self_attn.q_proj``), so
``peft.PeftModel.from_pretrained(base, directory)`` loads what :func:`export_peft` writes and :func:`import_peft`
reads what ``PeftModel.save_pretrained`` writes.

Modules trained beside the adapters (``LoRA(trainable_modules=["lm_head"])``: a head, embeddings, norms) are written
and read as peft's ``modules_to_save`` (:mod:`lightning_qlora.lora.peft_modules`): whole tensors under
``base_model.model.<module>.<tensor>``.

Directories are written atomically (:func:`atomic_directory`): a crash leaves either the old adapter or the new one
at ``directory``, never a mix or a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.lora.experts import load_peft_experts, peft_expert_tensors, unwrap_peft_key
from lightning_qlora.lora.layer import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    is_lora_parameter,
    lora_modules,
    lora_scaling,
)
from lightning_qlora.lora.peft_modules import (
    TIE_KEY,
    SavedModules,
    load_saved_modules,
    plan_saved_modules,
    saved_modules,
)
from lightning_qlora.lora.peft_targets import peft_target_modules, split_targets
from lightning_qlora.quantization.experts import is_experts_module
from lightning_qlora.quantization.linear_probe import conv1d_class, is_linear_like
from lightning_qlora.quantization.nf4 import is_4bit_linear
from lightning_qlora.quantization.shells import linear_shape
from lightning_qlora.utils.atomic import atomic_directory
from lightning_qlora.utils.errors import first_line
from lightning_qlora.utils.finite import check_finite_tensors

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_ADAPTER_FILES = frozenset({CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME})
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")  # optional ".<adapter name>"
_UNSUPPORTED = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "alora_invocation_tokens": "aLoRA"} | {
    key: key  # config fields whose non-default value changes what the weights mean
    for key in ("lora_bias", "layer_replication", "trainable_token_indices")
}


def _sources(layers: dict[str, LoRALinear]) -> list[LoRALinear]:
    """The adapted layers whose base records the module it replaced (GPT-2's ``Conv1D`` sets ``fan_in_fan_out``)."""
    return [layer for layer in layers.values() if getattr(layer.base_layer, "source_cls", None) is not None]


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    config: LoRAConfig,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    saved: SavedModules | None = None,
) -> Path:
    """Write ``model``'s adapters as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads.

    Module names are relative to ``model`` (pass the Hugging Face model root). ``target_modules`` lists the distinct
    last name components of the adapted layers when PEFT's suffix matching picks exactly those layers, else their
    full names (e.g. when ``exclude_modules`` left some ``q_proj`` out). Layers whose rank or alpha differs from the
    most common one go into ``rank_pattern``/``alpha_pattern``. Modules trained outside the adapters (parameters that
    require grad in a model whose base is frozen, as the LoRA callback's ``trainable_modules`` leave them) are written
    whole as peft's ``modules_to_save`` (an input embedding tied to the head with ``ensure_weight_tying``), so peft
    and :func:`import_peft` load them too. Tensors keep their dtype. The directory is replaced atomically (see
    :func:`atomic_directory`); other files already in it (a tokenizer, a README) are kept.

    Args:
        model: the model holding :class:`LoRALinear` layers.
        directory: output folder (created or replaced).
        config: the LoRA settings the model was injected with (dropout, rsLoRA).
        base_model_name_or_path: recorded for ``PeftModel``/``AutoPeftModel``; default: ``model.config._name_or_path``.
        task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or None.
        saved: the trained modules, from :func:`~lightning_qlora.lora.peft_modules.saved_modules` (default: read
            here; a sharded model gathers them on every rank first and passes them to the rank that writes).

    Returns:
        The adapter directory.

    Raises:
        ValueError: if the model has no adapters, a layer's scaling disagrees with ``config.use_rslora``, or a trained
            module cannot be written as ``modules_to_save`` (one line naming it and what to do; nothing is written).
        NonFiniteError: if an adapter tensor holds NaN/inf (nothing is written).
    """
    layers = dict(lora_modules(model))
    expert_tensors, target_parameters = peft_expert_tensors(model)
    target_modules, linear_parameters = split_targets(model, list(layers), bool(expert_tensors))
    if not layers and not expert_tensors:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to export; call inject_lora(model, config) first")
    saved = saved_modules(model) if saved is None else saved
    tensors: dict[str, torch.Tensor] = {PEFT_PREFIX + k: v for k, v in expert_tensors.items()}
    tensors.update({PEFT_PREFIX + k: v for k, v in saved.tensors.items()})
    shapes: dict[str, tuple[int, float]] = {}
    for name, layer in layers.items():
        expected = lora_scaling(layer.r, layer.alpha, config.use_rslora)
        if not math.isclose(layer.scaling, expected, rel_tol=1e-9):
            raise ValueError(
                f"LoRA layer {name} has scaling {layer.scaling:g} but r={layer.r}, alpha={layer.alpha:g} with "
                f"use_rslora={config.use_rslora} gives {expected:g}; pass the LoRAConfig the model was injected with"
            )
        shapes[name] = (layer.r, float(layer.alpha))
        for which in ("A", "B"):
            tensor = getattr(layer, f"lora_{which}").detach().to("cpu").contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_{which}.weight"] = tensor
    check_finite_tensors(tensors, f"the PEFT adapter {directory}")
    counts: dict[tuple[int, float], int] = {}
    for shape in shapes.values():
        counts[shape] = counts.get(shape, 0) + 1
    main = (config.r, float(config.alpha))
    main = main if main in counts or not counts else max(counts, key=lambda s: counts[s])
    rank_pattern = {f"^{re.escape(n)}": r for n, (r, _) in shapes.items() if r != main[0]}
    alpha_pattern = {f"^{re.escape(n)}": _number(a) for n, (_, a) in shapes.items() if a != main[1]}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "r": main[0],
        "lora_alpha": _number(main[1]),
        # peft's ParamWrapper (expert stacks) refuses dropout; it only acts in training, never on the outputs
        "lora_dropout": 0.0 if expert_tensors else float(config.dropout),
        "target_modules": target_modules,
        "fan_in_fan_out": any(layer.base_layer.source_cls is conv1d_class() for layer in _sources(layers)),
        "bias": "none",
        "use_rslora": bool(config.use_rslora),
        "use_dora": False,
        "modules_to_save": saved.modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    if target_parameters or linear_parameters:
        adapter_config["target_parameters"] = target_parameters + linear_parameters
    if saved.tied:
        adapter_config[TIE_KEY] = True
    from safetensors.torch import save_file

    with atomic_directory(directory, owned=lambda n: n in _ADAPTER_FILES) as tmp:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return Path(directory).expanduser().resolve()


# ------------------------------------------------------------------------------------------------------- import
def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ValueError(f"PEFT adapter directory {directory} does not exist; pass the folder holding {CONFIG_NAME}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing; pass a folder written by export_peft or PeftModel.save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({first_line(err)}); re-export the adapter") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object; re-export the adapter")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{path} describes a {config.get('peft_type')!r} adapter; import_peft reads LoRA adapters only "
            "(peft_type 'LORA'), load other kinds with peft itself"
        )
    used = [label for key, label in _UNSUPPORTED.items() if config.get(key) not in (None, False, [], {}, "")]
    if used:
        raise ValueError(f"{path} uses {', '.join(used)}, which import_peft does not support; load it with peft")
    return config


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = directory / SAFETENSORS_NAME
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return path, {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"{path} is not a readable safetensors file ({first_line(err)}); re-export it") from err
    path = directory / BIN_NAME
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle/zip errors of many types
            raise ValueError(f"{path} is not a readable torch checkpoint ({first_line(err)}); re-export it") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} is not a dict of tensors; re-export the adapter")
        return path, state
    raise ValueError(f"{directory} has neither {SAFETENSORS_NAME} nor {BIN_NAME}; re-export the adapter")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching a ``.``-suffix of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _group_weights(
    path: Path, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({layer: {"A": a, "B": b}}, {other key: tensor})``, keys without the ``base_model.model.`` prefix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            others[key.removeprefix(PEFT_PREFIX)] = tensor
            continue
        groups.setdefault(match["module"], {})[match["which"]] = tensor
    if not groups:
        raise ValueError(f"{path} holds no LoRA tensors; re-export the adapter")
    for name, pair in groups.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path} has lora_A or lora_B but not both for {name}; re-export the adapter")
    return groups, others


def import_peft(model: nn.Module, directory: str | os.PathLike) -> LoRAConfig:
    """Load a PEFT LoRA adapter into ``model``, injecting :class:`LoRALinear` layers where there are none yet.

    The layers adapted are exactly those the weight file names (PEFT saves one A/B pair per adapted layer); ranks
    come from the tensors, alphas from ``lora_alpha``/``alpha_pattern``. Adapter weights are copied into fp32 master
    weights (or the dtype of adapters already injected); ``modules_to_save`` tensors (a trained head, embeddings) are
    copied into the modules they name, in the model's dtype. Everything is validated before ``model`` is changed.
    Afterwards the adapter's tensors (LoRA matrices, ``modules_to_save``) require grad and the rest of the model does
    not, as after the LoRA callback's freezing: :func:`export_peft` writes the same adapter back.

    Args:
        model: the Hugging Face model root the adapter was trained on (plain or 4-bit linear layers).
        directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``).

    Returns:
        The adapter's settings as a :class:`LoRAConfig` (r, alpha, dropout, target/exclude modules, rsLoRA).

    Raises:
        ValueError: for a missing folder or file, a non-LoRA adapter, unreadable or truncated weights, keys naming no
            linear layer of ``model`` (nor a tensor of its ``modules_to_save``), shapes that do not fit it (an adapter
            for a different base model), or ``modules_to_save`` this model cannot hold as peft does (a tie peft
            would undo, a 4-bit module).
    """
    directory = Path(directory).expanduser()
    cfg = _read_config(directory)
    path, tensors = _read_weights(directory)
    groups, others = _group_weights(path, tensors)
    use_rslora = bool(cfg.get("use_rslora", False))
    alpha_default = cfg.get("lora_alpha", 8)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # linear layers peft adapts through target_parameters (see split_targets)
        targets = targets + [
            t.removesuffix(".weight") for t in cfg.get("target_parameters") or [] if t.endswith(".weight")
        ]
    excludes = cfg.get("exclude_modules")
    try:
        result = LoRAConfig(
            r=int(cfg.get("r", 8)),
            alpha=float(alpha_default),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=(sorted(targets) if isinstance(targets, list) else targets) or sorted(groups),
            exclude_modules=[excludes] if isinstance(excludes, str) else sorted(excludes or []),
            use_rslora=use_rslora,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {first_line(err)}; fix or re-export the adapter") from err

    plan: dict[tuple[int, float], list[str]] = {}
    loads: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    modules = dict(model.named_modules())
    experts = {k: v for k, v in groups.items() if is_experts_module(modules.get(unwrap_peft_key(k)[0], nn.Module()))}
    groups = {k: v for k, v in groups.items() if k not in experts}
    missing = [name for name in groups if name not in modules]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} adapter key(s) name modules {type(model).__name__} does not have (e.g. "
            f"{PEFT_PREFIX}{missing[0]}.lora_A.weight); load it onto the Hugging Face model root it was trained on"
        )
    for name, pair in sorted(groups.items()):
        module = modules[name]
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if not (is_linear_like(base) or is_4bit_linear(base)):
            raise ValueError(f"{path}: {name} is a {type(base).__name__}, not a linear layer; wrong base model")
        in_features, out_features = linear_shape(base)
        a, b = pair["A"], pair["B"]
        rank = a.shape[0] if a.dim() == 2 else -1
        fits = a.dim() == 2 and b.dim() == 2 and b.shape[1] == rank
        if not fits or (b.shape[0], a.shape[1]) != (out_features, in_features):
            raise ValueError(
                f"{path}: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} but the layer is "
                f"{out_features}x{in_features}; this is an adapter for a different base model"
            )
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, alpha_default))
        if isinstance(module, LoRALinear):
            scaling = lora_scaling(rank, alpha, use_rslora)
            if module.r != rank or not math.isclose(module.scaling, scaling, rel_tol=1e-9):
                raise ValueError(
                    f"{name} already has a LoRA adapter with r={module.r}, scaling={module.scaling:g}, but {path} has "
                    f"r={rank}, scaling={scaling:g}; import onto a model without adapters or with the same settings"
                )
        else:
            plan.setdefault((rank, alpha), []).append(name)
        loads.append((name, a, b))
    adapted = {unwrap_peft_key(k)[0] for k in experts} | set(groups)
    saved = plan_saved_modules(model, others, cfg, adapted, path)

    before = {id(m) for m in model.modules()}
    for (rank, alpha), names in plan.items():
        sub = LoRAConfig(
            r=rank, alpha=alpha, dropout=result.dropout, target_modules=names, use_rslora=use_rslora, head_modules=[]
        )
        inject_lora(model, sub)
    with torch.no_grad():
        for name, a, b in loads:
            layer = model.get_submodule(name)
            layer.lora_A.copy_(a.to(layer.lora_A.dtype))
            layer.lora_B.copy_(b.to(layer.lora_B.dtype))
    if experts:
        load_peft_experts(model, experts, list(cfg.get("target_parameters") or []), result, str(path))
    for name, param in model.named_parameters():
        if not is_lora_parameter(name):
            param.requires_grad_(False)
    load_saved_modules(saved)  # the trained modules require grad again
    _follow_parent_mode(model, before)
    return result


def _follow_parent_mode(model: nn.Module, old: set[int]) -> None:
    """Give modules not in ``old`` (by id) the train/eval mode of their nearest old ancestor: no dropout in eval."""
    named = dict(model.named_modules())
    for name, module in named.items():
        if id(module) in old:
            continue
        parent = name
        while parent and id(named[parent]) not in old:
            parent = parent.rpartition(".")[0]
        module.training = named[parent].training


__all__ = ["export_peft", "import_peft", "peft_target_modules"]
