"""``lightning-qlora memory --config recipe.yaml``: the memory plan of a recipe, before any weight is loaded.

Reads what decides memory from the same YAML that ``fit`` runs: the model's ``config.json`` (a local directory, a
config ``.json``, a GGUF/``pkg://`` source through :func:`~lightning_qlora.models.sources.resolve_model_dir`, or
only the ``config.json`` of a hub id), the data module's ``batch_size``/``max_length``, the ``LoRA`` callback, the
``NF4Precision`` plugin, the strategy (optimizer, DDP/FSDP) and ``trainer.devices``; then prints
:meth:`~lightning_qlora.memory.planner.MemoryPlan.format_table` and, with ``--budget``, the advice.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from lightning_qlora.lora.layer import LoRAConfig
from lightning_qlora.memory.planner import MemoryPlan, plan_memory
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.utils.errors import first_line
from lightning_qlora.utils.formatting import format_bytes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"40G"`` (binary), ``"48GB"`` (decimal) or a plain number of bytes -> bytes.

    Raises:
        ValueError: for anything else.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget {text!r} is not a size; write e.g. 80GiB, 40G or 48GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _entry(value: Any) -> tuple[str, dict[str, Any]]:
    """``(class_path, init_args)`` of a YAML ``class_path``/``init_args`` entry (or a bare string)."""
    if isinstance(value, dict):
        return str(value.get("class_path", "")), dict(value.get("init_args") or {})
    return str(value or ""), {}


def _with_defaults(class_path: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """``init_args`` completed with the class's own defaults (when the class can be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "lightning_qlora"), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return init_args
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **init_args}


def _set_dotted(config: dict[str, Any], key: str, value: str) -> None:
    """Apply ``--trainer.devices=2``-style overrides (values parsed as YAML)."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override --{key}: {part!r} is not a section of the recipe")
    node[parts[-1]] = yaml.safe_load(value)


def _model_config_source(source: str, cache_dir: str | None) -> Any:
    """A local directory/``.json`` with the model's config; for a hub id only its ``config.json`` is fetched."""
    from lightning_qlora.models.sources import ModelSourceError, resolve_model_dir

    local = Path(str(source)).expanduser()
    if str(source).startswith("pkg://") or local.exists() or str(source).count("/") != 1:
        return resolve_model_dir(source, cache_dir)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(str(source), "config.json")
    except Exception as err:  # offline, gated, or a typo
        reason = first_line(err, 160)
        raise ModelSourceError(f"could not get config.json of {source!r} ({reason}); pass a local directory") from err


def _device_count(devices: Any, num_nodes: Any) -> int:
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()):
        count = int(devices)
    else:  # "auto", -1, None: one device unless told otherwise
        count = 1
    return max(1, count) * max(1, int(num_nodes or 1))


def plan_recipe(
    recipe: dict[str, Any],
    devices: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    sharding: str | None = None,
) -> MemoryPlan:
    """The :class:`~lightning_qlora.memory.planner.MemoryPlan` of a ``fit`` recipe (a parsed YAML dict).

    Args:
        recipe: the recipe with ``model``, ``data`` and ``trainer`` sections.
        devices: GPUs (default the recipe's ``trainer.devices`` × ``num_nodes``).
        batch_size: sequences per device per step (default the data module's ``batch_size``).
        seq_len: tokens per sequence (default the data module's ``max_length``: the longest a batch can be).
        sharding: ``ddp`` or ``fsdp`` (default from the strategy: FSDP strategies shard, others replicate).

    Raises:
        ValueError: when the recipe has no model source or the values cannot be planned.
    """
    model_path, model_args = _entry(recipe.get("model"))
    model_args = _with_defaults(model_path, model_args)
    source = model_args.get("model")
    if not source:
        raise ValueError("the recipe has no model.init_args.model; set the model directory, .json, GGUF or hub id")
    data_path, data_args = _entry(recipe.get("data"))
    data_args = _with_defaults(data_path, data_args)
    trainer = recipe.get("trainer") or {}
    lora, checkpointing = LoRAConfig(), False
    for callback in trainer.get("callbacks") or []:
        path, args = _entry(callback)
        if path.rsplit(".", 1)[-1] == "LoRA":
            fields = {f.name for f in dataclasses.fields(LoRAConfig)}
            lora = LoRAConfig(**{k: v for k, v in args.items() if k in fields and v is not None})
            checkpointing = bool(args.get("gradient_checkpointing", False))
    quantization = None
    for plugin in trainer.get("plugins") or []:
        path, args = _entry(plugin)
        if path.rsplit(".", 1)[-1] == "NF4Precision":
            fields = {f.name for f in dataclasses.fields(QuantizationConfig)}
            args = {k: (tuple(v) if k == "skip_modules" else v) for k, v in args.items() if v is not None}
            quantization = QuantizationConfig(**{k: v for k, v in args.items() if k in fields})
    strategy_path, strategy_args = _entry(trainer.get("strategy"))
    strategy_args = _with_defaults(strategy_path, strategy_args) if "." in strategy_path else strategy_args
    name = strategy_path.lower()
    optimizer = strategy_args.get("optimizer") if isinstance(strategy_args.get("optimizer"), str) else None
    optimizer = optimizer or ("paged_adamw_32bit" if "paged" in name else "adamw")
    count = devices or _device_count(trainer.get("devices", 1), trainer.get("num_nodes", 1))
    return plan_memory(
        _model_config_source(str(source), model_args.get("cache_dir")),
        batch_size=int(batch_size or data_args.get("batch_size") or 1),
        seq_len=int(seq_len or data_args.get("max_length") or 2048),
        lora=lora,
        quantization=quantization,
        quantize=quantization is not None,
        optimizer=optimizer,
        gradient_checkpointing=checkpointing,
        dtype=model_args.get("dtype") or "bf16",
        devices=count,
        sharding=sharding or ("fsdp" if "fsdp" in name else "ddp"),
        loss_chunk_size=model_args.get("loss_chunk_size"),
        device_type="cpu" if str(trainer.get("accelerator", "")).lower() == "cpu" else "cuda",
        trust_remote_code=bool(model_args.get("trust_remote_code", False)),
    )


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors become a ``ValueError`` that ``lightning-qlora`` prints as one line."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse's hook
        raise ValueError(f"memory: {message} (options: lightning-qlora memory --help)")


def memory_command(argv: list[str]) -> None:
    """Run ``lightning-qlora memory`` with the arguments after ``memory`` (``--help`` lists them).

    Raises:
        ValueError: for a missing recipe or values that cannot be planned (``main`` prints it as one line).
    """
    parser = _OneLineParser(
        prog="lightning-qlora memory",
        description="Predict the memory of a recipe's training step (no weights are loaded). Other --section.key=value "
        "arguments override the recipe, e.g. --trainer.devices=2 --data.init_args.batch_size=4.",
    )
    parser.add_argument("--config", required=True, help="the recipe YAML (as for fit)")
    parser.add_argument("--budget", help="memory per GPU, e.g. 80GiB: prints what to change when the plan exceeds it")
    parser.add_argument("--devices", type=int, help="number of GPUs (default: trainer.devices)")
    parser.add_argument("--sharding", choices=("ddp", "fsdp"), help="default: from the recipe's strategy")
    parser.add_argument("--batch-size", type=int, help="sequences per GPU per step (default: data batch_size)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: data max_length)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    known, rest = parser.parse_known_args(argv)
    path = Path(known.config)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; pass the YAML you would give to fit --config")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} is not a YAML mapping with model/data/trainer sections")
    for arg in rest:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise ValueError(f"memory: cannot read {arg!r}; overrides look like --trainer.devices=2")
        _set_dotted(recipe, key, value)
    budget = parse_bytes(known.budget) if known.budget else None
    plan = plan_recipe(recipe, known.devices, known.batch_size, known.seq_len, known.sharding)
    if known.json:
        payload = {k: v for k, v in plan.as_dict().items() if k != "settings"}
        payload["settings"] = {k: v for k, v in plan.settings.items() if k != "arguments"}
        payload["advice"] = plan.advice(budget) if budget else None
        print(json.dumps(payload, indent=2, default=str))
        return
    print(plan.format_table())
    if budget is not None:
        advice = plan.advice(budget)
        if not advice:
            print(f"\nfits the budget of {format_bytes(budget)} per GPU")
        else:
            print(f"\nover the budget of {format_bytes(budget)} per GPU; options:")
            print("\n".join(f"  - {line}" for line in advice))
    sys.stdout.flush()
