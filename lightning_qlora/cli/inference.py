"""The fine-tuned model for inference, built once for ``generate``, ``chat``, ``serve`` (and exports).

:func:`load_for_inference` builds the recipe's model as ``fit`` does (``configure_model`` under the Trainer's
:class:`~lightning_qlora.NF4Precision`: 4-bit base, quantized on load, on the Trainer's device), loads an adapter (a
PEFT folder or a Lightning checkpoint of the LoRA callback, by :func:`lightning_qlora.lora.loading.load_adapter`) and
freezes it in eval mode. :class:`InferenceCLI` reads
the same recipe the model was trained with (``--config``, overrides as for ``fit``) plus the command's options.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.precision import Precision
from typing_extensions import override

from lightning_qlora.callbacks.lora import LoRA
from lightning_qlora.cli.recipe import RECIPE_CLI_ARGS
from lightning_qlora.data.inference_prompts import adds_special_tokens, render_prompts, resolve_prompt_style
from lightning_qlora.lora.loading import adapter_kind
from lightning_qlora.lora.loading import load_adapter as load_lora_adapter
from lightning_qlora.models.generation import GenerationOptions, context_window, encode_prompts
from lightning_qlora.plugins.checkpoint_io import later_run_note, load_checkpoint_file
from lightning_qlora.plugins.precision import NF4Precision
from lightning_qlora.utils.modules import model_root

ADAPTER_HELP = (
    "a PEFT adapter folder (adapter_config.json) or a Lightning .ckpt of the LoRA callback; 'auto' (default): the "
    "recipe's LoRA export_dir when it holds an adapter; 'none': the base model alone"
)


def load_for_inference(
    module: pl.LightningModule, trainer: pl.Trainer, adapter: str | os.PathLike | None = None
) -> str:
    """Build ``module``'s network as ``fit`` does, load ``adapter`` into it, and freeze it in eval mode, in place.

    The network is built by ``configure_model`` under ``trainer.init_module()`` (with
    :class:`~lightning_qlora.NF4Precision` the base is quantized to 4 bits as it loads, on the Trainer's device),
    then the precision plugin converts what is left (as the Trainer's setup would) and the adapter is loaded.

    Args:
        module: a LightningModule with ``.model`` (a transformers causal LM, built in ``configure_model`` or
            ``__init__``) and ``.tokenizer``, such as :class:`~lightning_qlora.CausalLM`.
        trainer: the Trainer whose device and precision plugin to use (kept alive by the caller).
        adapter: a PEFT adapter folder or a Lightning checkpoint written with the LoRA callback; None: the base.

    Returns:
        What was loaded, in words (for a status line).

    Raises:
        ValueError: for a module without ``.model``/``.tokenizer``, or an adapter that is not one or does not fit.
        FileNotFoundError: if ``adapter`` does not exist.
    """
    if not hasattr(module, "tokenizer") or not hasattr(module, "model"):
        raise ValueError(
            f"{type(module).__name__} has no .model and .tokenizer; use lightning_qlora.CausalLM (or a module that "
            "exposes both)"
        )
    module.trainer = trainer
    if getattr(module, "model", None) is None:
        with trainer.init_module():
            module.configure_model()
    trainer.precision_plugin.convert_module(module)  # NF4Precision: quantize what is still full precision
    module.to(trainer.strategy.root_device)
    loaded = load_adapter(module, adapter, trainer) if adapter is not None else "no adapter"
    module.eval()
    module.requires_grad_(False)
    if trainer.strategy.root_device.type == "cpu":
        from lightning_qlora.quantization.nf4_linear import use_cpu_inference_kernel

        use_cpu_inference_kernel(module)  # AVX512-BF16 CPUs, bf16 compute: bitsandbytes' fused 4-bit kernel
    return loaded


def load_adapter(module: pl.LightningModule, adapter: str | os.PathLike, trainer: pl.Trainer | None = None) -> str:
    """Load a PEFT adapter folder or a LoRA callback's Lightning checkpoint into ``module`` (built already).

    The Trainer path of :func:`lightning_qlora.lora.loading.load_adapter`: a checkpoint is read safely
    (``weights_only``) and its base fingerprint compared with ``module``'s network under the Trainer's quantization.

    Args:
        module: the LightningModule (its ``.model`` gets the adapters).
        adapter: a folder with ``adapter_config.json``, or a ``.ckpt`` file.
        trainer: the Trainer the base was built with (its quantization settings are checked against a checkpoint's).

    Returns:
        What was loaded, in words.

    Raises:
        FileNotFoundError: if ``adapter`` does not exist.
        ValueError: for a folder without an adapter, a checkpoint without LoRA metadata, or one of another base.
    """
    path = Path(adapter).expanduser()
    checkpoint = load_checkpoint_file(path) if adapter_kind(path) == "checkpoint" else None
    state = trainer.precision_plugin.state_dict() if trainer is not None else {}
    load_lora_adapter(module, path, checkpoint, root=model_root(module), quantization=state.get("quantization"))
    if checkpoint is None:
        return f"PEFT adapter {path}"
    return f"adapter of checkpoint {path} (step {int(checkpoint.get('global_step', 0))}){later_run_note(path)}"


@dataclass
class Inference:
    """A loaded model ready to complete prompts, with the prompt settings it was trained with."""

    module: pl.LightningModule
    """The LightningModule (``.model``: the network, 4-bit base + adapter, eval mode; ``.tokenizer``)."""
    trainer: pl.Trainer
    """The Trainer that built it (device, precision plugin); ``generate`` predicts with it."""
    options: GenerationOptions
    """Decoding options from the command line."""
    prompt_style: str = "chat_template"
    """``chat_template`` (the tokenizer's) or ``alpaca``, as in training (``data.prompt_style`` of the recipe)."""
    system_prompt: str | None = None
    """System message added to conversations without one, as in training."""
    adapter: str | None = None
    """The adapter :meth:`load` loads (a PEFT folder or a ``.ckpt``), None for the base model alone."""
    loaded: str = ""
    """What :meth:`load` loaded, in words."""

    def load(self) -> Inference:
        """Build the model and load the adapter (:func:`load_for_inference`); returns self."""
        self.loaded = load_for_inference(self.module, self.trainer, self.adapter)
        return self

    @property
    def model(self) -> Any:
        """The transformers model."""
        return self.module.model

    @property
    def tokenizer(self) -> Any:
        """Its tokenizer."""
        return self.module.tokenizer

    @property
    def style(self) -> str:
        """The prompt style in effect: ``chat_template`` falls back to ``alpaca`` without a chat template."""
        return resolve_prompt_style(self.tokenizer, self.prompt_style)  # type: ignore[arg-type]

    @property
    def add_special_tokens(self) -> bool:
        """Whether prompts get the tokenizer's BOS, as training tokenized them."""
        return adds_special_tokens(self.tokenizer, self.prompt_style)  # type: ignore[arg-type]

    def forward_context(self) -> Any:
        """The precision plugin's forward context (autocast to its compute dtype), as in training."""
        return self.trainer.precision_plugin.forward_context()

    def with_system_prompt(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """``messages`` with the training system prompt first, when they have no system message."""
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, messages: list[dict[str, str]], where: str = "the conversation") -> str:
        """The prompt text for a conversation, up to the assistant's turn."""
        return render_prompts(self.tokenizer, [messages], self.prompt_style, [where])[0]  # type: ignore[arg-type]

    def encode(self, prompts: list[str]) -> dict[str, Any]:
        """Left-padded ``input_ids``/``attention_mask`` for rendered prompts."""
        return encode_prompts(self.tokenizer, prompts, self.add_special_tokens)

    def context_window(self) -> int | None:
        """The model's context window from its ``config.json``, read without building the model (None: unknown)."""
        model_dir = getattr(self.module, "model_dir", None)
        if model_dir is None:
            return None
        from transformers import AutoConfig

        trust = bool(getattr(self.module, "hparams", {}).get("trust_remote_code", False))
        return context_window(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust))


class InferenceCLI(LightningCLI):
    """Read a recipe (``--config``, overrides) for inference: its model, precision plugin and prompt settings.

    The recipe's Trainer is not built: an inference Trainer on one device with the recipe's accelerator and precision
    plugin (:class:`~lightning_qlora.NF4Precision` when it names none and ``--quantize`` is on), no logger and no
    checkpoints. :meth:`inference` gathers what the command needs; its ``load()`` builds the model with
    :func:`load_for_inference`.

    Args:
        args: the command line after the command name.
        parser_class: the CLI's parser (``OneLineErrorParser``: bad input is one line).
        prog: the command, for help and errors (``lightning-qlora generate``).
        description: one line for ``--help``.
        add_arguments: adds the command's own options to the parser.
        progress_bar: show Lightning's progress bar (``generate``).
        device: build the model on this device (``"cuda:1"``) rather than the recipe accelerator's first one.
        check_arguments: checks the command's own options (the parsed config) before anything is built, raising
            one-line errors; the shared ones (decoding, ``--prompt_style``, an ``--adapter`` path) are checked then.
    """

    def __init__(
        self,
        args: list[str],
        parser_class: type[LightningArgumentParser],
        prog: str,
        description: str,
        add_arguments: Callable[[LightningArgumentParser], None] | None = None,
        progress_bar: bool = False,
        device: str | None = None,
        check_arguments: Callable[[Any], None] | None = None,
    ) -> None:
        self._add_command_arguments = add_arguments
        self._check_command_arguments = check_arguments
        self._progress_bar = progress_bar
        self._device = torch.device(device) if device is not None else None
        self.recipe_callbacks: list[Any] = []
        with warnings.catch_warnings():  # args always come from main(), which read sys.argv itself
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            self._init_cli(args, parser_class, prog, description)

    def _init_cli(
        self, args: list[str], parser_class: type[LightningArgumentParser], prog: str, description: str
    ) -> None:
        super().__init__(
            **RECIPE_CLI_ARGS,
            parser_class=parser_class,
            save_config_callback=None,
            seed_everything_default=False,  # the recipe's seed_everything still applies
            run=False,
            args=args,
            parser_kwargs={"prog": prog, "description": description},
        )

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The options every inference command shares (adapter, 4-bit, prompt settings, decoding)."""
        parser.add_argument("--adapter", type=str | None, default="auto", help=ADAPTER_HELP)
        parser.add_argument(
            "--quantize", type=bool, default=True, help="4-bit base (NF4Precision) when the recipe names no plugin"
        )
        parser.add_argument(
            "--prompt_style",
            type=str | None,
            default=None,
            help="chat_template or alpaca (default: the recipe's data.prompt_style, else chat_template)",
        )
        parser.add_argument(
            "--system_prompt", type=str | None, default=None, help="default: the recipe's data.system_prompt"
        )
        add_generation_arguments(parser)
        if self._add_command_arguments is not None:
            self._add_command_arguments(parser)

    @override
    def before_instantiate_classes(self) -> None:
        """Check the options that need nothing built, before the model and the Trainer are (one line each).

        Raises:
            ValueError: for a bad decoding option, ``--prompt_style`` or command option.
            FileNotFoundError: for an ``--adapter`` path that does not exist.
        """
        generation_options(self.config)
        style = self._get(self.config, "prompt_style")
        if style is not None:
            check_prompt_style(style)
        adapter = self._get(self.config, "adapter")
        if adapter is not None and str(adapter).lower() not in ("auto", "none"):
            adapter_kind(adapter)  # a PEFT folder or a checkpoint file
        if self._check_command_arguments is not None:
            self._check_command_arguments(self.config)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """An inference Trainer: the recipe's accelerator and precision plugin, one device, no logger or checkpoints."""
        config = dict(self._get(self.config_init, "trainer", default={}) or {})
        callbacks = config.get("callbacks") or []
        self.recipe_callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        precision = next((p for p in plugins if isinstance(p, Precision)), None)
        if precision is None and self._get(self.config_init, "quantize"):
            precision = NF4Precision()
        accelerator, devices = config.get("accelerator") or "auto", 1
        if self._device is not None:
            accelerator = self._device.type
            devices = [self._device.index] if self._device.index is not None else 1
        return pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            plugins=[precision] if precision is not None else None,
            precision=None if precision is not None else config.get("precision"),
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self._progress_bar,
            callbacks=[],
        )

    def adapter(self) -> str | None:
        """``--adapter``, with ``auto`` resolved to the recipe's LoRA ``export_dir`` when it holds an adapter."""
        adapter = self._get(self.config_init, "adapter")
        if adapter is None or str(adapter).lower() == "none":
            return None
        if adapter != "auto":
            return str(adapter)
        for callback in self.recipe_callbacks:
            export = getattr(callback, "export_dir", None) if isinstance(callback, LoRA) else None
            if export and (Path(export) / "adapter_config.json").is_file():
                return str(export)
        logging.getLogger(__name__).warning(
            "lightning-qlora: no adapter (the recipe's LoRA export_dir holds none); running the base model. Pass "
            "--adapter PATH for a trained adapter"
        )
        return None

    def inference(self) -> Inference:
        """The model (not built yet), its Trainer, decoding options and the recipe's prompt settings.

        Raises:
            ValueError: for a bad option.
        """
        options = generation_options(self.config_init)
        data = self.datamodule
        style = self._get(self.config_init, "prompt_style") or getattr(data, "prompt_style", None) or "chat_template"
        check_prompt_style(style)
        system = self._get(self.config_init, "system_prompt")
        system = system if system is not None else getattr(data, "system_prompt", None)
        if isinstance(getattr(self.model, "generation", None), GenerationOptions):
            self.model.generation = options
        return Inference(self.model, self.trainer, options, style, system, self.adapter())


def check_prompt_style(style: str) -> None:
    """Refuse a prompt style other than ``chat_template`` and ``alpaca``.

    Raises:
        ValueError: naming the style received.
    """
    if style not in ("chat_template", "alpaca"):
        raise ValueError(f"--prompt_style {style!r}: use chat_template or alpaca")


def add_generation_arguments(parser: LightningArgumentParser) -> None:
    """``--max_new_tokens``, ``--temperature``, ``--top_p``, ``--stop``, ``--seed`` (see :class:`GenerationOptions`)."""
    defaults = GenerationOptions()
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens, help="most tokens per answer")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy; > 0: sample")
    parser.add_argument("--top_p", type=float, default=defaults.top_p, help="nucleus sampling mass (1: off)")
    parser.add_argument("--stop", type=list[str], default=[], help="stop strings, e.g. '[\"###\"]'")
    parser.add_argument("--seed", type=int | None, default=None, help="seed for sampling")


def generation_options(config: Any) -> GenerationOptions:
    """The :class:`GenerationOptions` of parsed command-line options.

    Raises:
        ValueError: for an out-of-range option.
    """
    get = config.get if hasattr(config, "get") else lambda key: getattr(config, key, None)
    return GenerationOptions(
        max_new_tokens=get("max_new_tokens"),
        temperature=get("temperature"),
        top_p=get("top_p"),
        stop=list(get("stop") or []),
        seed=get("seed"),
    )


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's and NF4Precision's info lines (devices, footprint) off the terminal inside the block.

    The loggers' levels are restored after it, so a command run in-process (tests, notebooks) leaves them as found.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_qlora")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


__all__ = ["Inference", "InferenceCLI", "load_adapter", "load_for_inference"]
