"""``lightning-qlora export``: the fine-tuned model as GGUF (llama.cpp, Ollama), merged safetensors, or a PEFT adapter.

The base model comes from ``--model`` or the recipe it was trained with (``--config``: model source, tokenizer, dtype
and the ``NF4Precision`` settings), else from the checkpoint's own hyperparameters; the adapter is a PEFT folder or
an adapter-only Lightning checkpoint written with the ``LoRA`` callback. For ``gguf`` and ``safetensors`` the adapter
is folded into the base (:func:`~lightning_qlora.lora.merge.merge_lora`): by default into the dequantized 4-bit
weights it was trained against (``--base-weights quantized``, what the fine-tune computed), or into the base
checkpoint's own full-precision weights (``--base-weights original``). Every output folder is replaced atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from lightning_qlora.utils.errors import first_line
from lightning_qlora.utils.formatting import format_bytes

FORMATS = ("gguf", "safetensors", "peft")
_DTYPES = {"gguf": ("bf16", "f16", "q8_0"), "safetensors": ("bf16", "f16", "fp32"), "peft": ()}
_DESCRIPTION = (
    "Export a fine-tune: --format gguf (merged model for llama.cpp/Ollama, with a Modelfile), safetensors (merged "
    "transformers checkpoint) or peft (the adapter). The base model comes from --model, the training recipe "
    "(--config) or the checkpoint; the adapter is a PEFT folder or a .ckpt written with the LoRA callback."
)


class _Parser(argparse.ArgumentParser):
    """Errors as one ``ValueError`` line (``main`` prints ``lightning-qlora: error: ...`` and exits with 2)."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"export: {message} (options: lightning-qlora export --help)")


def build_parser() -> argparse.ArgumentParser:
    """The ``export`` command line."""
    parser = _Parser(prog="lightning-qlora export", description=_DESCRIPTION)
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically; other files kept)")
    parser.add_argument("--adapter", help="PEFT adapter folder or LoRA checkpoint (.ckpt); gguf/safetensors: "
                        "optional (none: the base model alone)")  # fmt: skip
    parser.add_argument("--config", help="the recipe YAML the adapter was trained with (model, tokenizer, NF4)")
    parser.add_argument("--model", help="base model source (folder, .gguf, pkg:// or hub id); overrides --config")
    parser.add_argument("--tokenizer", help="tokenizer source (default: the recipe's, else the model's)")
    parser.add_argument("--dtype", help="gguf: bf16, f16 (default) or q8_0; safetensors: bf16 (default), f16, fp32")
    parser.add_argument(
        "--base-weights",
        choices=("quantized", "original"),
        help="merge into the dequantized 4-bit base the adapter was trained on (default when training was 4-bit) or "
        "into the original weights",
    )
    parser.add_argument("--name", help="gguf: the model name stored in the file (general.name)")
    return parser


@dataclasses.dataclass
class ExportSource:
    """Where the base model and its settings come from (resolved from the flags, the recipe and the adapter)."""

    model: str
    """Model source for :func:`~lightning_qlora.models.sources.resolve_model_dir`."""
    tokenizer: str | None = None
    """Tokenizer source (``None``: the model's own)."""
    cache_dir: str | None = None
    """Where GGUF conversions are cached."""
    dtype: str | None = None
    """Dtype of the unquantized parameters (``None``: the checkpoint's own)."""
    quantization: Any = None
    """The ``QuantizationConfig`` training used (``None``: a full-precision base)."""


def _recipe_source(path: str) -> ExportSource:
    from lightning_qlora.cli.memory import _check_yaml, _instance, parse_recipe
    from lightning_qlora.plugins.precision import NF4Precision

    if not Path(path).is_file():
        raise FileNotFoundError(f"export: recipe {path} does not exist; pass the YAML you trained with")
    _check_yaml(path)
    try:
        config = parse_recipe(["--config", path])
    except ValueError as err:
        raise ValueError(str(err).replace("lightning-qlora memory --help", "lightning-qlora export --help")) from None
    init = (config.get("model") or {}).get("init_args") or {}
    if not init.get("model"):
        raise ValueError(f"export: recipe {path} has no model.init_args.model; pass --model")
    precision = _instance(config.trainer.plugins, NF4Precision)
    return ExportSource(
        model=str(init["model"]),
        tokenizer=init.get("tokenizer"),
        cache_dir=init.get("cache_dir"),
        dtype=init.get("dtype"),
        quantization=precision.config if precision is not None else None,
    )


def _checkpoint(path: Path) -> dict[str, Any]:
    """The LoRA checkpoint at ``path``, read safely; refused in one line when the LoRA callback did not write it."""
    from lightning_qlora.lora.loading import checkpoint_lora_config
    from lightning_qlora.plugins.checkpoint_io import later_run_note, load_checkpoint_file

    checkpoint = load_checkpoint_file(path)
    if note := later_run_note(path):
        print(f"lightning-qlora export: using {path}{note}", file=sys.stderr, flush=True)
    try:
        checkpoint_lora_config(checkpoint, path)
    except ValueError as err:
        raise ValueError(f"export: {err}") from None
    return checkpoint


def resolve_source(args: argparse.Namespace, checkpoint: dict[str, Any] | None) -> ExportSource:
    """The base model: ``--model``, else the recipe's, else the checkpoint's or the PEFT adapter's base.

    Raises:
        ValueError: when none of them names a base model.
    """
    from lightning_qlora.quantization.nf4 import QuantizationConfig

    source = _recipe_source(args.config) if args.config else None
    hparams = dict((checkpoint or {}).get("hyper_parameters") or {})
    saved_quantization = ((checkpoint or {}).get("NF4Precision") or {}).get("quantization")
    if source is None:
        model = args.model or hparams.get("model") or _peft_base(args.adapter)
        if not model:
            raise ValueError("export: pass --model (the base model) or --config (the recipe you trained with)")
        quantization = QuantizationConfig(**saved_quantization) if saved_quantization else QuantizationConfig()
        source = ExportSource(str(model), hparams.get("tokenizer"), hparams.get("cache_dir"), hparams.get("dtype"),
                              quantization)  # fmt: skip
    elif args.model:
        source.model = args.model
    source.tokenizer = args.tokenizer or source.tokenizer
    if args.base_weights == "original":
        source.quantization = None
    elif args.base_weights == "quantized" and source.quantization is None:
        source.quantization = QuantizationConfig()
    return source


def _peft_base(adapter: str | None) -> str | None:
    """``base_model_name_or_path`` of a PEFT adapter folder, when it names a folder that exists here."""
    config = Path(adapter or "") / "adapter_config.json"
    if not adapter or not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return base if base and Path(base).exists() else None


def _load_tokenizer(source: ExportSource) -> Any:
    """The tokenizer: the recipe's or ``--tokenizer``, else the model's own."""
    from transformers import AutoTokenizer

    from lightning_qlora.models.sources import ModelSourceError, resolve_model_dir

    where = source.tokenizer or source.model
    if not source.tokenizer or str(where).endswith(".gguf") or str(where).startswith("pkg://"):
        where = resolve_model_dir(where, source.cache_dir)  # GGUF conversions carry the tokenizer
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"export: tokenizer {where} cannot be loaded ({first_line(err)})") from None


def _load_model(source: ExportSource, adapter: str | None, checkpoint: dict[str, Any] | None) -> tuple[nn.Module, Any]:
    """``(transformers model in eval mode with the adapter injected, its LoRAConfig or None)``."""
    from lightning_qlora.models.sources import load_causal_lm, load_config, resolve_model_dir
    from lightning_qlora.utils.dtypes import to_dtype

    model_dir = resolve_model_dir(source.model, source.cache_dir)
    dtype = to_dtype(source.dtype) if source.dtype else getattr(load_config(model_dir), "dtype", None)
    dtype = to_dtype(dtype or torch.float32)
    quantization = source.quantization if adapter else None  # nothing to merge: the original weights as they are
    root = load_causal_lm(model_dir, quantization=quantization, dtype=dtype)
    if not adapter:
        return root.eval(), None
    from lightning_qlora.lora.loading import load_adapter

    try:  # a checkpoint's base fingerprint is checked as a resume would; the 4-bit parts only against a 4-bit base
        lora = load_adapter(
            root,
            adapter,
            checkpoint,
            quantization=quantization.describe() if quantization is not None else None,
            compare_quantization=quantization is not None,
            remedy="pass the --model or --config it was trained with",
        )
    except ValueError as err:
        raise ValueError(f"export: {err}") from None
    return root.eval(), lora


def _check_args(args: argparse.Namespace) -> None:
    allowed = _DTYPES[args.format]
    if args.dtype is not None and args.dtype not in allowed:
        which = f"one of {', '.join(allowed)}" if allowed else "no --dtype (adapter tensors keep theirs)"
        raise ValueError(f"export: --dtype {args.dtype!r} does not apply to --format {args.format}; use {which}")
    if args.format == "peft" and not args.adapter:
        raise ValueError("export: --format peft needs --adapter (a PEFT folder or a LoRA .ckpt)")
    if args.adapter:  # a PEFT folder or a checkpoint file, said before anything is read
        from lightning_qlora.lora.loading import adapter_kind

        try:
            adapter_kind(args.adapter)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"export: {err}") from None
    if args.format != "gguf" and args.name:
        raise ValueError("export: --name applies to --format gguf only")
    if args.config and not Path(args.config).is_file():
        raise FileNotFoundError(f"export: recipe {args.config} does not exist; pass the YAML you trained with")


def _check_out(out: Path, source: ExportSource, adapter: Path | None) -> None:
    """Refuse an ``--out`` that is the base model's folder or the adapter's (the export would replace its input)."""
    from lightning_qlora.models.sources import resolve_model_dir

    inputs = {"the adapter": adapter} if adapter is not None and adapter.is_dir() else {}
    try:
        inputs["the base model"] = Path(resolve_model_dir(source.model, source.cache_dir))
    except Exception:  # not resolvable here (a hub id offline, say): loading the model says why, later
        pass
    target = out.expanduser().resolve()
    for what, folder in inputs.items():
        if target == folder.expanduser().resolve():
            raise ValueError(
                f"export: --out {out} is the folder of {what}, which the export would replace; pick another"
            )


def export_command(argv: list[str]) -> None:
    """Run ``lightning-qlora export`` with the arguments after ``export`` (``--help`` lists them).

    Args:
        argv: the command line after ``export``.

    Raises:
        ValueError: for bad flags, an unsupported architecture or dtype, or an adapter that does not fit the base.
        FileNotFoundError: for a missing adapter or recipe.
    """
    args = build_parser().parse_args(argv)
    _check_args(args)
    adapter = Path(args.adapter).expanduser() if args.adapter else None
    checkpoint = _checkpoint(adapter) if adapter is not None and adapter.is_file() else None
    source = resolve_source(args, checkpoint)
    _check_out(Path(args.out), source, adapter)
    if args.format == "gguf":  # refuse an unsupported architecture before anything is loaded
        from lightning_qlora.models.gguf_export import gguf_architecture
        from lightning_qlora.models.sources import load_config, resolve_model_dir

        gguf_architecture(load_config(resolve_model_dir(source.model, source.cache_dir)))
    tokenizer = _load_tokenizer(source) if args.format != "peft" else None
    if args.format == "gguf":
        from lightning_qlora.models.gguf_vocab import tokenizer_model

        tokenizer_model(tokenizer)  # and an unsupported tokenizer before the (slow) load and merge
    root, lora = _load_model(source, args.adapter, checkpoint)
    if args.format == "peft":
        from lightning_qlora.lora.peft_format import export_peft

        path = export_peft(root, args.out, lora)  # records the resolved base folder, as the LoRA callback does
        print(f"lightning-qlora export: PEFT adapter written to {path}", flush=True)
        return
    merged = ""
    if lora is not None:
        from lightning_qlora.lora.merge import merge_lora

        store = torch.float32 if args.format == "gguf" else _torch_dtype(args.dtype or "bf16")  # gguf rounds at the end
        report = merge_lora(root, "bf16", dtype=store)
        base = "the dequantized 4-bit base" if source.quantization is not None else "the original weights"
        merged = f"; {len(report.layers)} layers merged into {base} (max error {report.max_abs_error:.2e})"
    if args.format == "gguf":
        from lightning_qlora.models.gguf_export import export_gguf

        result = export_gguf(root, tokenizer, args.out, args.dtype or "f16", args.name)
        size = format_bytes(result.file_bytes)
        print(f"lightning-qlora export: {result.path} ({result.architecture}, {result.dtype}, {size}) and "
              f"{result.modelfile.name}{merged}", flush=True)  # fmt: skip
        return
    _save_safetensors(root, tokenizer, Path(args.out), args.dtype or "bf16")
    print(f"lightning-qlora export: merged model written to {Path(args.out).resolve()}{merged}", flush=True)


def _torch_dtype(name: str) -> torch.dtype:
    from lightning_qlora.utils.dtypes import to_dtype

    return to_dtype({"f16": "fp16"}.get(name, name))


def _save_safetensors(root: nn.Module, tokenizer: Any, out: Path, dtype: str) -> None:
    """The merged model (:func:`save_merged_safetensors`) and its tokenizer, swapped in as one folder."""
    from lightning_qlora.lora.merge import save_merged_safetensors
    from lightning_qlora.utils.atomic import atomic_directory

    with torch.no_grad():
        for param in root.parameters():  # unadapted layers too: from_pretrained loads all in the config's dtype
            param.data = param.data.to(_torch_dtype(dtype)) if param.is_floating_point() else param.data

    def owned(name: str) -> bool:
        return name.startswith(("model", "pytorch_model", "tokenizer", "config", "generation_config"))

    with atomic_directory(out, owned) as tmp:
        save_merged_safetensors(root, tmp)
        tokenizer.save_pretrained(tmp)


__all__ = ["FORMATS", "ExportSource", "build_parser", "export_command", "resolve_source"]
