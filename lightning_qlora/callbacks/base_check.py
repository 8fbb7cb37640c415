"""``BaseCheck``: adapters are only ever resumed onto the base model they were trained on.

The LoRA callback stores the base's fingerprint (:mod:`lightning_qlora.lora.fingerprint`) in every checkpoint and
checks it on load, before Lightning copies the checkpoint's tensors into the module (a wrong base would otherwise
fail there with torch's multi-line size-mismatch error). A base built in ``__init__`` is quantized after Lightning
restores, so its 4-bit codes are compared later, before the first training or validation step.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_qlora.lora.fingerprint import codes_pending, describe_mismatch, fingerprint_digest, fingerprint_parts
from lightning_qlora.lora.layer import LoRAConfig
from lightning_qlora.lora.loading import CHECKPOINT_KEY
from lightning_qlora.utils.modules import model_root, unwrapped_name

__all__ = ["CHECKPOINT_KEY", "BaseCheck", "check_checkpoint_matches", "refuse_other_base"]


class BaseCheck:
    """Writes and checks the base-model metadata of checkpoints for one :class:`~lightning_qlora.LoRA` callback.

    Args:
        config: the adapter settings checkpoints must match.
    """

    def __init__(self, config: LoRAConfig) -> None:
        self.config = config
        self._checked: dict | None = None  # the checkpoint dict last checked against this base
        self._codes_to_check: dict | None = None  # its base parts, when the 4-bit codes can only be compared later

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Check checkpoints in the module's own ``on_load_checkpoint``, which Lightning runs before loading tensors."""
        original = pl_module.on_load_checkpoint
        if getattr(original, "_base_check", None) is not None:
            original._base_check = self  # type: ignore[attr-defined]  # the latest LoRA callback checks
            return

        @functools.wraps(original)
        def on_load_checkpoint_then_check(checkpoint: dict) -> None:
            original(checkpoint)
            on_load_checkpoint_then_check._base_check.check(  # type: ignore[attr-defined]
                getattr(pl_module, "_trainer", None), pl_module, checkpoint
            )

        on_load_checkpoint_then_check._base_check = self  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = on_load_checkpoint_then_check  # type: ignore[method-assign]

    def parts(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> dict[str, Any]:
        """Fingerprint parts of the frozen base: the sharding strategy's (taken before sharding) or computed now."""
        taken = getattr(trainer.strategy, "base_fingerprint", None) if trainer is not None else None
        return taken if taken is not None else fingerprint_parts(model_root(pl_module), _quantization(trainer))

    def metadata(self, trainer: pl.Trainer, pl_module: nn.Module, trainable: set[str]) -> dict[str, Any]:
        """What a checkpoint stores under :data:`CHECKPOINT_KEY`."""
        parts = self.parts(trainer, pl_module)
        return {
            "fingerprint": fingerprint_digest(parts),
            "base": parts,
            "lora": self.config.to_dict(),
            "trainable_keys": sorted(trainable),
        }

    def check(self, trainer: pl.Trainer | None, pl_module: nn.Module, checkpoint: dict) -> None:
        """Refuse ``checkpoint`` when it was written for another base or adapter shape (once per checkpoint).

        Raises:
            ValueError: naming the mismatch and what to do.
        """
        if self._checked is checkpoint:  # already checked by the module hook, before its state was loaded
            return
        parts = self.parts(trainer, pl_module)
        check_checkpoint_matches(checkpoint, pl_module, fingerprint_digest(parts), self.config, parts)
        self._checked = checkpoint
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("base")
        self._codes_to_check = saved if saved is not None and codes_pending(saved, parts) else None

    def check_codes(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Compare the 4-bit codes a checkpoint was written for, once the base is quantized (no-op otherwise).

        Raises:
            ValueError: when they differ.
        """
        saved, self._codes_to_check = self._codes_to_check, None
        if saved is not None:
            refuse_other_base(saved, self.parts(trainer, pl_module))


def _quantization(trainer: pl.Trainer | None) -> dict[str, Any] | None:
    state = trainer.precision_plugin.state_dict() if trainer is not None else {}
    return state.get("quantization")


def refuse_other_base(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise when the base parts a checkpoint was written for differ from this model's.

    Raises:
        ValueError: naming what differs (see :func:`~lightning_qlora.lora.fingerprint.describe_mismatch`).
    """
    cause = describe_mismatch(saved, current)
    if cause is not None:
        raise ValueError(
            f"checkpoint does not belong to this base model: {cause}; resume with the same base model and "
            "NF4Precision settings as the run that wrote it"
        )


def check_checkpoint_matches(
    checkpoint: dict,
    pl_module: nn.Module,
    fingerprint: str,
    config: LoRAConfig,
    parts: dict[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint written for another base model or adapter shape.

    Args:
        checkpoint: the loaded Lightning checkpoint.
        pl_module: the module it is being loaded into.
        fingerprint: :func:`~lightning_qlora.lora.fingerprint.fingerprint_digest` of the module's base.
        config: the LoRA settings of this run.
        parts: :func:`~lightning_qlora.lora.fingerprint.fingerprint_parts` of the module's base; when given (and the
            checkpoint has them too) the error names what differs: quantization, architecture or weights.

    Raises:
        ValueError: naming the mismatch and what to do.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        return  # a plain Lightning checkpoint: strict shape checks already ran when it was loaded
    if parts is not None and meta.get("base") is not None:
        refuse_other_base(meta["base"], parts)
    elif meta["fingerprint"] != fingerprint:
        raise ValueError(
            f"checkpoint was written for a different base model (fingerprint {meta['fingerprint']}, this model is "
            f"{fingerprint}); resume with the same base model and quantization settings"
        )
    saved = meta.get("lora", {})
    for key in ("r", "alpha", "use_rslora"):
        if key in saved and saved[key] != getattr(config, key):
            raise ValueError(
                f"checkpoint was trained with LoRA {key}={saved[key]!r} but the callback has "
                f"{key}={getattr(config, key)!r}; use the checkpoint's LoRA settings to resume"
            )
    have = {unwrapped_name(name) for name, _ in pl_module.named_parameters()}
    missing = [k for k in meta.get("trainable_keys", []) if k not in have]
    if missing:
        raise ValueError(
            f"checkpoint has adapter weights for {len(missing)} layers this model lacks (e.g. "
            f"{missing[0]}); use the same target_modules as the run that wrote it"
        )
