"""Load a trained adapter into a model: a PEFT folder, or the adapter of a checkpoint the LoRA callback wrote.

The one place an adapter is loaded to be used (``generate``, ``chat``, ``serve`` through
:func:`lightning_qlora.cli.inference.load_for_inference`, and ``export``). A PEFT folder goes through
:func:`~lightning_qlora.lora.peft_format.import_peft`. A Lightning checkpoint carries, under :data:`CHECKPOINT_KEY`,
the LoRA settings of its run, the names of the tensors it trained and the base model's fingerprint
(:mod:`lightning_qlora.lora.fingerprint`): the adapters are injected with those settings, the base is compared with
the fingerprint (a checkpoint of another base is refused in one line before any tensor is copied), then only the
trained tensors are copied, each checked to fit. Reading the checkpoint file is the caller's
(:func:`lightning_qlora.plugins.checkpoint_io.load_checkpoint_file`: ``weights_only``, one-line errors).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_qlora.lora.experts import inject_expert_lora
from lightning_qlora.lora.fingerprint import describe_mismatch, fingerprint_digest, fingerprint_parts
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, is_lora_parameter
from lightning_qlora.lora.peft_format import CONFIG_NAME, import_peft
from lightning_qlora.utils.modules import unwrapped_name

CHECKPOINT_KEY = "lightning_qlora"
"""Key of the LoRA metadata in a Lightning checkpoint: fingerprint, base parts, LoRA settings, trainable keys."""

DEFAULT_REMEDY = "use the base model and recipe it was trained with"
"""What an error about a checkpoint of another base tells the user to do, unless the caller says otherwise."""


def adapter_kind(adapter: str | os.PathLike) -> Literal["peft", "checkpoint"]:
    """Whether ``adapter`` is a PEFT adapter folder or a checkpoint file.

    Args:
        adapter: a folder with ``adapter_config.json``, or a ``.ckpt`` file.

    Raises:
        FileNotFoundError: if ``adapter`` does not exist.
        ValueError: for a sharded (FSDP) checkpoint folder, or a folder without ``adapter_config.json`` (naming a
            ``.ckpt`` in it, if any).
    """
    path = Path(adapter).expanduser()
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return "peft"
    if path.is_file():
        return "checkpoint"
    if not path.exists():
        raise FileNotFoundError(
            f"adapter {path} does not exist; pass a PEFT adapter folder (with {CONFIG_NAME}) or a .ckpt file"
        )
    if (path / "meta.pt").is_file() or (path / ".metadata").is_file():  # torch.distributed.checkpoint's layout
        raise ValueError(
            f"adapter {path} is a sharded (FSDP) checkpoint, read only to resume training; pass the run's PEFT export "
            "(LoRA(export_dir=...)) or a checkpoint saved with state_dict_type='full'"
        )
    found = sorted(path.glob("*.ckpt"))
    hint = f", such as {found[-1]}" if found else ""
    raise ValueError(f"adapter {path} is a folder without {CONFIG_NAME}; pass a PEFT adapter or a .ckpt file{hint}")


def checkpoint_lora_config(checkpoint: Mapping[str, Any], source: str | os.PathLike) -> LoRAConfig:
    """The LoRA settings a checkpoint was trained with (written there by the LoRA callback).

    Args:
        checkpoint: the loaded Lightning checkpoint.
        source: its path, for messages.

    Raises:
        ValueError: for a checkpoint without the LoRA callback's metadata.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or not isinstance(meta.get("lora"), dict) or not meta["lora"]:
        raise ValueError(
            f"checkpoint {source} has no LoRA adapter settings (it was not written with the LoRA callback); pass a "
            "LoRA checkpoint or a PEFT adapter folder"
        )
    return LoRAConfig.from_dict(meta["lora"])


def load_adapter(
    model: nn.Module,
    adapter: str | os.PathLike,
    checkpoint: Mapping[str, Any] | None = None,
    *,
    root: nn.Module | None = None,
    quantization: Mapping[str, Any] | None = None,
    compare_quantization: bool = True,
    remedy: str = DEFAULT_REMEDY,
) -> LoRAConfig:
    """Load a PEFT adapter folder or a LoRA checkpoint's adapter into ``model`` (injecting its adapters).

    ``root``'s own parameters are frozen first (as the LoRA callback freezes the base); the adapter's tensors are not:
    its LoRA matrices and the modules it trained besides (a PEFT folder's ``modules_to_save``, a checkpoint's
    ``trainable_modules``), so :func:`~lightning_qlora.lora.peft_format.export_peft` writes them all back.

    Args:
        model: what the adapters are injected into: for a checkpoint, the module it was written from (its tensor
            names and LoRA ``target_modules`` are relative to it; a different prefix such as the ``model.`` of a
            LightningModule around ``root`` is found and stripped).
        adapter: the PEFT folder or the checkpoint's path (:func:`adapter_kind` tells which).
        checkpoint: the checkpoint, read already (``load_checkpoint_file(adapter)``), when ``adapter`` is a file.
        root: the network inside ``model`` (a transformers model): what a PEFT adapter's names are relative to and
            what the base fingerprint describes; default ``model``.
        quantization: the settings ``root``'s 4-bit weights were quantized with (``QuantizationConfig.describe()``,
            or ``NF4Precision.state_dict()["quantization"]``); ``None`` for a full-precision base.
        compare_quantization: ``False`` when ``root`` holds the original full-precision weights of the 4-bit base
            the adapter was trained on (merging into them): the quantization settings and codes are not compared.
        remedy: what an error about a checkpoint of another base says to do (the command's own words).

    Returns:
        The adapter's :class:`~lightning_qlora.lora.layer.LoRAConfig`.

    Raises:
        FileNotFoundError: if ``adapter`` does not exist.
        ValueError: one line for an adapter that is not one, a checkpoint without the LoRA callback's metadata, of
            another base model, without adapter tensors, or with tensors that do not fit ``model``.
    """
    root = model if root is None else root
    root.requires_grad_(False)  # the frozen base, as in training: what the fingerprint describes
    if adapter_kind(adapter) == "peft":
        return import_peft(root, Path(adapter).expanduser())
    if checkpoint is None:
        raise TypeError(f"load_adapter: {adapter} is a checkpoint file; read it first and pass it as checkpoint=")
    return load_checkpoint_adapter(
        model,
        checkpoint,
        adapter,
        root=root,
        quantization=quantization,
        compare_quantization=compare_quantization,
        remedy=remedy,
    )


def load_checkpoint_adapter(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    source: str | os.PathLike,
    *,
    root: nn.Module | None = None,
    quantization: Mapping[str, Any] | None = None,
    compare_quantization: bool = True,
    remedy: str = DEFAULT_REMEDY,
) -> LoRAConfig:
    """Inject a LoRA checkpoint's adapters into ``model`` and copy its trained tensors, once its base is checked.

    Arguments as for :func:`load_adapter` (``source``: the checkpoint's path, for messages).

    Returns:
        The checkpoint's :class:`~lightning_qlora.lora.layer.LoRAConfig`.

    Raises:
        ValueError: see :func:`load_adapter`.
    """
    root = model if root is None else root
    root.requires_grad_(False)  # the frozen base, as in training: what the fingerprint describes
    config = checkpoint_lora_config(checkpoint, source)
    meta = checkpoint[CHECKPOINT_KEY]
    inject_lora(model, config)
    inject_expert_lora(model, config)
    _refuse_other_base(meta, root, source, dict(quantization) if quantization else None, compare_quantization, remedy)
    state = checkpoint.get("state_dict") or {}
    keys = set(meta.get("trainable_keys") or [])
    tensors = {k: v for k, v in state.items() if (unwrapped_name(k) in keys if keys else is_lora_parameter(k))}
    if not tensors:
        raise ValueError(
            f"checkpoint {source} holds no adapter tensors; pass a checkpoint the LoRA callback wrote during training"
        )
    own = {unwrapped_name(name): param for name, param in model.named_parameters()}
    prefix = _prefix(unwrapped_name(next(iter(tensors))), own)
    with torch.no_grad():
        for name, value in tensors.items():
            key = unwrapped_name(name)
            target = own.get(key[len(prefix) :]) if prefix is not None and key.startswith(prefix) else None
            if target is None:
                raise ValueError(
                    f"checkpoint {source} has tensors this model lacks (e.g. {name}: another base, or other LoRA "
                    f"target_modules); {remedy}"
                )
            if target.shape != value.shape:
                raise ValueError(
                    f"checkpoint {source} tensor {name} is {tuple(value.shape)} there and {tuple(target.shape)} here "
                    f"(another base, or other LoRA settings); {remedy}"
                )
            target.copy_(value.to(target.dtype))
            target.requires_grad_(True)  # trained: a head of trainable_modules is exported as modules_to_save
    return config


def _prefix(key: str, own: Mapping[str, Any]) -> str | None:
    """What to strip from checkpoint names to get ``own``'s (``""``, ``"model."``), ``None`` if nothing fits."""
    parts = key.split(".")
    for i in range(len(parts)):
        if ".".join(parts[i:]) in own:
            return "".join(f"{part}." for part in parts[:i])
    return None


def _refuse_other_base(
    meta: Mapping[str, Any],
    root: nn.Module,
    source: str | os.PathLike,
    quantization: dict[str, Any] | None,
    compare_quantization: bool,
    remedy: str,
) -> None:
    """Raise when the checkpoint's base fingerprint is not ``root``'s (before any tensor is copied)."""
    saved = meta.get("base")
    current = fingerprint_parts(root, quantization)
    if saved is not None:
        if not compare_quantization:  # the original weights: no 4-bit settings (nor codes) to compare
            current["quantization"] = saved.get("quantization")
        cause = describe_mismatch(saved, current)
        if cause is not None:
            raise ValueError(f"checkpoint {source} does not belong to this base model: {cause}; {remedy}")
    elif compare_quantization and meta.get("fingerprint") not in (None, fingerprint_digest(current)):
        raise ValueError(
            f"checkpoint {source} was written for a different base model (fingerprint {meta['fingerprint']}, this "
            f"model is {fingerprint_digest(current)}); {remedy}"
        )


__all__ = [
    "CHECKPOINT_KEY",
    "adapter_kind",
    "checkpoint_lora_config",
    "load_adapter",
    "load_checkpoint_adapter",
]
