"""``lightning-qlora memory --config recipe.yaml``: the memory plan of a recipe, before any weight is loaded.

The recipe goes through ``fit``'s own LightningCLI parser (class-signature defaults, ``--a.b=c`` overrides, type
checks, ``class_path``/``init_args``), but only the ``LoRA`` callback and ``NF4Precision`` plugin are built: no
model, data module, trainer or weights. From the parsed config it reads the model's ``config.json`` (through
:func:`~lightning_qlora.models.sources.resolve_model_dir`, or only the ``config.json`` of a hub id), the data
module's ``batch_size``/``max_length``, the callbacks that are a ``LoRA``, the plugins that are an ``NF4Precision``,
the strategy (optimizer, DDP/FSDP) and ``trainer.devices``; then prints
:meth:`~lightning_qlora.memory.planner.MemoryPlan.format_table` and, with ``--budget``, the advice.

A recipe whose model is a :class:`~lightning_qlora.PreferenceLM` is planned as its objective's step
(``preference=method``: the reference forward of DPO and IPO, the sequence scores), with ``2 × batch_size``
sequences a step: the data module's ``batch_size`` counts pairs, each a chosen and a rejected sequence.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry

from lightning_qlora.callbacks.lora import LoRA
from lightning_qlora.cli.recipe import RECIPE_CLI_ARGS
from lightning_qlora.memory.planner import MemoryPlan, plan_memory
from lightning_qlora.models.preference import PreferenceLM
from lightning_qlora.plugins.precision import NF4Precision
from lightning_qlora.strategies.single_device import PagedOptimizerMixin
from lightning_qlora.utils.errors import first_line
from lightning_qlora.utils.formatting import format_bytes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip
_OPTIONS = ("--help", "--json", "--print_config", "--budget", "--devices", "--sharding", "--batch-size", "--seq-len")
_DESCRIPTION = (
    "Predict the memory of a recipe's training step (no weights are loaded). The recipe is parsed as by fit: "
    "--section.key=value arguments override it, e.g. --trainer.devices=2 --data.init_args.batch_size=4."
)


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"40G"`` (binary), ``"48GB"`` (decimal) or a plain number of bytes -> bytes.

    Raises:
        ValueError: for anything else.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget {text!r} is not a size; write e.g. 80GiB, 40G or 48GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class _RecipeCLI(LightningCLI):
    """``fit``'s parser, as :func:`lightning_qlora.cli.main.main` sets it up, plus the planner's options.

    It parses and instantiates nothing. ``pl.Trainer`` stands for ``QLoRATrainer`` (same init arguments; ``cli.main``
    imports this module, so importing it back would be a cycle).
    """

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser: dict[str, Any]) -> None:
        self._subcommand_method_arguments: dict[str, list[str]] = {}
        self.parser = self._prepare_subcommand_parser(self.trainer_class, "fit", **main_kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--budget", type=str | None, help="memory per GPU, e.g. 80GiB: prints what to change "
                            "when the plan exceeds it")  # fmt: skip
        parser.add_argument("--devices", type=int | None, help="number of GPUs (default: trainer.devices x num_nodes)")
        parser.add_argument("--sharding", choices=("ddp", "fsdp"), help="default: from the strategy")
        parser.add_argument("--batch-size", type=int | None, help="sequences per GPU per step (default: the data "
                            "module's batch_size; twice it for a PreferenceLM, whose rows are pairs)")  # fmt: skip
        parser.add_argument("--seq-len", type=int | None, help="tokens per sequence (default: data max_length)")
        parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")

    def parse_arguments(self, parser: Any, args: Any) -> None:  # ``args`` are given: no warning about sys.argv
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)

    def _set_seed(self) -> None:  # planning draws no random numbers: leave the global seed alone
        pass

    def instantiate_classes(self) -> None:  # the point: no model, data module or trainer
        pass


def parse_recipe(args: list[str] | dict[str, Any]) -> Namespace:
    """Parse ``fit``-style arguments (``["--config", "recipe.yaml", "--trainer.devices=2"]``) or a recipe dict.

    Args:
        args: command-line arguments after ``memory``, or a recipe as a dict (``model``, ``data``, ``trainer``).

    Raises:
        ValueError: for an unreadable YAML, an unknown key, a value of the wrong type or a class that is not found,
            in one line (``lightning-qlora`` prints it as ``lightning-qlora: error: ...`` and exits with 2).
    """
    kwargs = {"prog": "lightning-qlora memory", "description": _DESCRIPTION, "exit_on_error": False}
    try:
        cli = _RecipeCLI(**RECIPE_CLI_ARGS, trainer_class=pl.Trainer, load_from_checkpoint_support=False, run=False,
                         parser_kwargs=kwargs, args=args)  # fmt: skip
        return cli.config
    except argparse.ArgumentError as err:  # as fit says it: the class's own complaint, one line
        text = " ".join(str(err).split()) or "invalid arguments"
        specific = re.search(r"Problem with given class_path (.*?)(?: - Expected a| - Not a valid subclass|$)", text)
        text = f"{text.split(':')[0]}: {specific.group(1).strip()}" if specific else text
        raise ValueError(f"{text[:400]} (options: lightning-qlora memory --help)") from err


def _check_yaml(path: str) -> None:
    """Name the file and line when a ``--config`` is not YAML (jsonargparse's message names neither)."""
    try:
        with open(path, encoding="utf-8") as handle:
            yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError):
        return  # a missing file: jsonargparse says so
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise ValueError(f"config {path}{where}: not valid YAML ({problem}); fix the file") from None


def _entries(value: Any) -> list[tuple[type | None, dict[str, Any]]]:
    """``(class, init_args)`` of each parsed ``class_path`` entry; registered names (strategies) resolved too."""
    entries = []
    for item in value if isinstance(value, list) else [] if value is None else [value]:
        if isinstance(item, Namespace) and item.get("class_path"):
            module, _, name = item.class_path.rpartition(".")  # jsonargparse resolved it: it imports
            cls = getattr(importlib.import_module(module), name)
            entries.append((cls, (item.get("init_args") or Namespace()).as_dict()))
        elif isinstance(item, str) and item in StrategyRegistry:
            found = StrategyRegistry[item]
            params = inspect.signature(found["strategy"]).parameters.values()
            defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
            entries.append((found["strategy"], {**defaults, **found["init_params"]}))
        else:  # "auto", an unregistered name, or an instance
            entries.append((item if isinstance(item, type) else None, {}))
    return entries


def _instance(value: Any, base: type) -> Any:
    """The entry of ``value`` whose class is ``base`` or a subclass, built from its parsed ``init_args``."""
    return next((cls(**args) for cls, args in _entries(value) if isinstance(cls, type) and issubclass(cls, base)), None)


def _model_config_source(source: str, cache_dir: str | None) -> Any:
    """A local directory/``.json`` with the model's config; for a hub id only its ``config.json`` is fetched."""
    from lightning_qlora.models.sources import ModelSourceError, resolve_model_dir

    local = Path(str(source)).expanduser()
    if str(source).startswith(("pkg://", ".", "/", "~")) or local.exists() or str(source).count("/") != 1:
        return resolve_model_dir(source, cache_dir)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(str(source), "config.json")
    except Exception as err:  # offline, gated, or a typo
        reason = first_line(err, 160)
        raise ModelSourceError(f"could not get config.json of {source!r} ({reason}); pass a local directory") from err


def _device_count(devices: Any, num_nodes: Any) -> int:
    """``trainer.devices`` (a count, a list of ids; ``"auto"``, -1 or ``None``: one) times ``num_nodes``."""
    text = str(devices).strip()
    count = len(devices) if isinstance(devices, (list, tuple)) else int(text) if text.isdigit() else 1
    return max(1, count) * max(1, int(num_nodes or 1))


def plan_recipe(
    recipe: Namespace | dict[str, Any],
    devices: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    sharding: str | None = None,
) -> MemoryPlan:
    """The :class:`~lightning_qlora.memory.planner.MemoryPlan` of a ``fit`` recipe.

    Args:
        recipe: the config :func:`parse_recipe` returns, or a recipe dict (parsed here, as ``fit`` would).
        devices: GPUs (default the recipe's ``trainer.devices`` × ``num_nodes``).
        batch_size: sequences per device per step (default the data module's ``batch_size``; for a
            :class:`~lightning_qlora.PreferenceLM`, twice it: each pair is a chosen and a rejected sequence, so an
            odd number is refused).
        seq_len: tokens per sequence (default the data module's ``max_length``: the longest a batch can be).
        sharding: ``ddp`` or ``fsdp`` (default from the strategy: FSDP strategies shard, others replicate).

    Raises:
        ValueError: when the recipe does not parse, has no model source, or cannot be planned.
    """
    config = recipe if isinstance(recipe, Namespace) else parse_recipe(recipe)
    model_args = (config.get("model") or Namespace()).get("init_args") or Namespace()
    preference = recipe_preference(config)
    if not model_args.get("model"):
        raise ValueError("the recipe has no model.init_args.model; set the model directory, .json, GGUF or hub id")
    if preference and batch_size and batch_size % 2:
        raise ValueError(
            f"batch size {batch_size} is odd, but a PreferenceLM ({preference}) step scores whole pairs (a chosen and "
            f"a rejected sequence each); pass an even number of sequences, e.g. {batch_size + 1}"
        )
    data_args = (config.get("data") or Namespace()).get("init_args") or Namespace()
    trainer = config.trainer
    lora = _instance(trainer.callbacks, LoRA)
    precision = _instance(trainer.plugins, NF4Precision)
    strategy, strategy_args = (_entries(trainer.strategy) or [(None, {})])[0]
    strategy = strategy if isinstance(strategy, type) else type(None)
    optimizer = strategy_args.get("optimizer") if issubclass(strategy, PagedOptimizerMixin) else None
    accelerator = trainer.accelerator
    on_cpu = str(accelerator).lower() == "cpu" or any(
        isinstance(cls, type) and issubclass(cls, CPUAccelerator) for cls, _ in _entries(accelerator)
    )
    return plan_memory(
        _model_config_source(str(model_args.model), model_args.get("cache_dir")),
        batch_size=int(batch_size or (2 if preference else 1) * int(data_args.get("batch_size") or 1)),
        seq_len=int(seq_len or data_args.get("max_length") or 2048),
        lora=lora.config if lora else None,
        quantization=precision.config if precision else None,
        quantize=precision is not None,
        optimizer=optimizer if isinstance(optimizer, str) else "adamw",
        gradient_checkpointing=bool(lora and lora.gradient_checkpointing),
        dtype=model_args.get("dtype") or "bf16",
        devices=devices or _device_count(trainer.devices, trainer.num_nodes),
        sharding=sharding or ("fsdp" if issubclass(strategy, (FSDPStrategy, ModelParallelStrategy)) else "ddp"),
        loss_chunk_size=model_args.get("loss_chunk_size"),
        device_type="cpu" if on_cpu else "cuda",
        trust_remote_code=bool(model_args.get("trust_remote_code", False)),
        preference=preference,
    )


def recipe_preference(recipe: Namespace) -> str | None:
    """The objective (``dpo``, ``ipo``, ``orpo``) of a recipe whose model is a ``PreferenceLM``, else ``None``.

    Args:
        recipe: the config :func:`parse_recipe` returns.
    """
    model = recipe.get("model")
    for cls, args in _entries(model):
        if isinstance(cls, type) and issubclass(cls, PreferenceLM):
            return str(args.get("method") or "dpo")
    return None


def _preference_line(plan: MemoryPlan) -> str | None:
    """One line on what a preference plan counts (``None`` for a supervised plan)."""
    method = plan.settings["arguments"].get("preference")
    if not method:
        return None
    s = plan.settings
    pairs = f"{s['batch_size'] // 2} pairs = " if s["batch_size"] % 2 == 0 else ""
    reference = s["phases"].get("reference forward")
    ref = "no reference"
    if reference:
        ref = f"reference forward (adapters off, no weights added) {format_bytes(reference)}"
    return f"preference: {method}, {pairs}{s['batch_size']} sequences a step; {ref}"


def memory_command(argv: list[str]) -> None:
    """Run ``lightning-qlora memory`` with the arguments after ``memory`` (``--help`` lists them).

    Args:
        argv: ``--config recipe.yaml``, the planner's options and ``--section.key=value`` overrides.

    Raises:
        ValueError: for a missing or unparsable recipe, a bad budget or values that cannot be planned, in one line
            (``main`` prints it as ``lightning-qlora: error: ...`` and exits with 2).
    """
    if not any(a in ("-c", "--config") or a.startswith(("--config=", "-h", "--help")) for a in argv):
        raise ValueError("memory: pass --config recipe.yaml (the YAML you would give to fit --config)")
    if argv and argv[-1].startswith("--") and "=" not in argv[-1] and argv[-1] not in _OPTIONS:
        raise ValueError(f"memory: cannot read {argv[-1]!r} without a value; overrides look like --trainer.devices=2")
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths + [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]:
        _check_yaml(path)
    config = parse_recipe(argv)
    budget = parse_bytes(config.budget) if config.budget else None
    plan = plan_recipe(config, config.devices, config.batch_size, config.seq_len, config.sharding)
    if config.json:
        payload = {k: v for k, v in plan.as_dict().items() if k != "settings"}
        payload["settings"] = {k: v for k, v in plan.settings.items() if k != "arguments"}
        payload["settings"]["preference"] = plan.settings["arguments"].get("preference")
        payload["advice"] = plan.advice(budget) if budget else None
        print(json.dumps(payload, indent=2, default=str))
        return
    print(plan.format_table())
    if (line := _preference_line(plan)) is not None:
        print(line)
    if budget is not None:
        advice = plan.advice(budget)
        if not advice:
            print(f"\nfits the budget of {format_bytes(budget)} per GPU")
        else:
            print(f"\nover the budget of {format_bytes(budget)} per GPU; options:")
            print("\n".join(f"  - {line}" for line in advice))
    sys.stdout.flush()
