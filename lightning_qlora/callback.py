"""``LoRA``: a Lightning callback that adds adapters to all linear layers and freezes the backbone."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_qlora.activation_checkpointing import CheckpointMode, checkpoint_kwargs, enable_gradient_checkpointing
from lightning_qlora.compilation import compile_blocks, graph_break_counts, graph_break_report
from lightning_qlora.fingerprint import codes_pending, describe_mismatch, fingerprint_digest, fingerprint_parts
from lightning_qlora.guards import check_finite_tensors
from lightning_qlora.lora import LoRAConfig, inject_lora, lora_modules, mark_only_lora_trainable

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "lightning_qlora"


def model_root(pl_module: nn.Module) -> nn.Module:
    """The wrapped network: ``pl_module.model`` when it is a module (HF style), else ``pl_module`` itself."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


class LoRA(Callback):
    """Inject ``h = W0·x + (alpha/r)·B·A·dropout(x)`` into all linear layers and train only the adapters.

    Works whether the model is built in ``__init__`` or in ``configure_model``, and in either order with
    :class:`~lightning_qlora.NF4Precision` (adapters are parameters, never quantized).

    Args:
        r: adapter rank.
        alpha: scale numerator (update scaled by ``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: ``"all-linear"`` (all but the output head), a regex over full names, or a list of names.
        exclude_modules: names or regexes never given an adapter.
        use_rslora: scale by ``alpha / sqrt(r)``.
        dtype: adapter master-weight dtype (default fp32; computed in the autocast dtype).
        trainable_modules: names of extra modules to keep trainable (e.g. ``["lm_head"]``).
        gradient_checkpointing: recompute block activations in backward (HF models: their own checkpointing,
            really on because the model is put in train mode; other models: each block of the largest ModuleList).
        checkpoint_mode: ``"full"`` recomputes whole blocks; ``"selective"`` keeps attention outputs and
            recomputes the rest (less recompute, slightly more memory).
        checkpoint_every_n_layers: checkpoint one block in this many (fewer recomputes, more memory).
        compile_blocks: compile each transformer block with ``torch.compile`` once adapters and checkpointing are in
            place (regional compilation, :func:`~lightning_qlora.compilation.compile_blocks`): one compile serves
            every layer; fuses the elementwise work around the matmuls. The first step pays the compile (tens of
            seconds). Single device and DDP; refused under the FSDP strategies.
        fused: train through the fused LoRA autograd function (saves only ``x`` and ``x·Aᵀ``; see
            :class:`~lightning_qlora.lora_function.LoRALinearFunction`); False uses the plain composition.
        adapter_only_checkpoints: save only trainable tensors in Lightning checkpoints (written atomically and loaded
            with ``weights_only=True``: Lightning's default checkpoint IO is swapped for ``AtomicCheckpointIO``).
        export_dir: if set, write a PEFT adapter (``adapter_config.json`` + safetensors) here at the end of fit.

    Raises:
        ValueError: for r ≤ 0, a target that matches nothing, or a model without linear layers.
    """

    def __init__(
        self,
        r: int = 64,
        alpha: float = 16.0,
        dropout: float = 0.1,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: list[str] | None = None,
        use_rslora: bool = False,
        dtype: str = "float32",
        trainable_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        checkpoint_mode: CheckpointMode = "full",
        checkpoint_every_n_layers: int = 1,
        compile_blocks: bool = False,
        fused: bool = True,
        adapter_only_checkpoints: bool = True,
        export_dir: str | None = None,
    ) -> None:
        checkpoint_kwargs(checkpoint_mode)  # fail now on a bad mode, not at fit start
        if checkpoint_every_n_layers < 1:
            raise ValueError(f"LoRA checkpoint_every_n_layers={checkpoint_every_n_layers} must be >= 1")
        self.config = LoRAConfig(
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=list(exclude_modules or []),
            use_rslora=use_rslora,
            dtype=dtype,
            fused=fused,
        )
        self.trainable_modules = list(trainable_modules or [])
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_mode = checkpoint_mode
        self.checkpoint_every_n_layers = checkpoint_every_n_layers
        self.compile_blocks = compile_blocks
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.export_dir = export_dir
        self.injected: list[str] = []
        self._checked: dict | None = None  # the checkpoint dict last checked against this base
        self._codes_to_check: dict | None = None  # its base parts, when the 4-bit codes can only be compared later
        self.trainable_params = 0
        self._graph_breaks_before: dict[str, int] | None = None  # counts at train start, while a check is due

    # ----------------------------------------------------------------- injection
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.strict_loading = False  # adapter-only checkpoints; on_load_checkpoint checks what matters
        if self.compile_blocks:
            refuse_sharded_compile(trainer)
        use_atomic_checkpoint_io(trainer)
        if any(isinstance(m, nn.Linear) for m in pl_module.modules()):
            self.apply(pl_module)
        self._check_before_loading(pl_module)
        original = pl_module.configure_model
        if getattr(original, "_lora_wrapped", False):
            return

        @functools.wraps(original)
        def configure_model_then_lora() -> None:
            original()
            if any(isinstance(m, nn.Linear) for m in pl_module.modules()):
                self.apply(pl_module)

        configure_model_then_lora._lora_wrapped = True  # type: ignore[attr-defined]
        pl_module.configure_model = configure_model_then_lora  # type: ignore[method-assign]

    def _check_before_loading(self, pl_module: pl.LightningModule) -> None:
        # Lightning loads the checkpoint's state dict right after the module's ``on_load_checkpoint`` and before the
        # callbacks' hook, so a wrong base would fail there with torch's multi-line size-mismatch error: check first.
        original = pl_module.on_load_checkpoint
        if getattr(original, "_lora_checked", False):
            original.callback = self  # type: ignore[attr-defined]  # the latest LoRA callback checks
            return

        @functools.wraps(original)
        def on_load_checkpoint_then_check(checkpoint: dict) -> None:
            original(checkpoint)
            callback = on_load_checkpoint_then_check.callback  # type: ignore[attr-defined]
            callback._check(getattr(pl_module, "_trainer", None), pl_module, checkpoint)

        on_load_checkpoint_then_check._lora_checked = True  # type: ignore[attr-defined]
        on_load_checkpoint_then_check.callback = self  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = on_load_checkpoint_then_check  # type: ignore[method-assign]

    def apply(self, pl_module: nn.Module) -> list[str]:
        """Inject adapters (idempotent), freeze the rest and set up gradient checkpointing; returns new names."""
        names = inject_lora(pl_module, self.config)
        self.injected += names
        self.trainable_params = mark_only_lora_trainable(pl_module, self.trainable_modules)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(model_root(pl_module), self.checkpoint_mode, self.checkpoint_every_n_layers)
        if self.compile_blocks:
            compile_blocks(model_root(pl_module))
        if names:
            rank_zero_info(f"LoRA: adapters on {len(self.injected)} layers, {self.trainable_params:,} trainable params")
        return names

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(True for _ in lora_modules(pl_module)):
            self.apply(pl_module)  # built lazily somewhere Lightning does not hook: still inject before training

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_codes(trainer, pl_module)
        # transformers' from_pretrained returns eval mode, which silently turns its checkpointing (and dropout) off
        pl_module.train()
        self._graph_breaks_before = graph_break_counts() if self.compile_blocks else None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._graph_breaks_before is not None:  # after the first step: the blocks have compiled
            report = graph_break_report(self._graph_breaks_before)
            self._graph_breaks_before = None
            if report is not None:
                rank_zero_warn(f"LoRA(compile_blocks=True): {report}")

    # ---------------------------------------------------------------- checkpoints
    def fingerprint(self, trainer: pl.Trainer, pl_module: nn.Module) -> str:
        """The base-model fingerprint for ``pl_module`` under this trainer's precision plugin."""
        return fingerprint_digest(self.fingerprint_parts(trainer, pl_module))

    def fingerprint_parts(self, trainer: pl.Trainer, pl_module: nn.Module) -> dict[str, Any]:
        """Architecture, quantization settings and value digests of ``pl_module``'s frozen base."""
        stashed = getattr(pl_module, "_lightning_qlora_base_parts", None)  # set by QLoRAFSDPStrategy before sharding
        return stashed if stashed is not None else fingerprint_parts(model_root(pl_module), _quantization(trainer))

    def _check(self, trainer: pl.Trainer | None, pl_module: nn.Module, checkpoint: dict) -> None:
        if self._checked is checkpoint:  # already checked by the module hook, before its state was loaded
            return
        parts = self.fingerprint_parts(trainer, pl_module)
        check_checkpoint_matches(checkpoint, pl_module, fingerprint_digest(parts), self.config, parts)
        self._checked = checkpoint
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("base")
        # a base built in __init__ is quantized after Lightning restores: compare its 4-bit codes before training
        self._codes_to_check = saved if saved is not None and codes_pending(saved, parts) else None

    def _check_codes(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        saved, self._codes_to_check = self._codes_to_check, None
        if saved is not None:
            refuse_other_base(saved, self.fingerprint_parts(trainer, pl_module))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_codes(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        trainable = {unwrapped_name(name) for name, p in pl_module.named_parameters() if p.requires_grad}
        if self.adapter_only_checkpoints:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        check_finite_tensors(
            {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}, "a checkpoint of the adapters"
        )
        parts = self.fingerprint_parts(trainer, pl_module)
        checkpoint[CHECKPOINT_KEY] = {
            "fingerprint": fingerprint_digest(parts),
            "base": parts,
            "lora": self.config.to_dict(),
            "trainable_keys": sorted(trainable),
        }

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check(trainer, pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lora": self.config.to_dict(), "injected": list(self.injected)}

    # --------------------------------------------------------------------- export
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir:
            full = getattr(trainer.strategy, "full_module_context", None)  # sharded strategies gather the adapters
            with full() if full is not None else contextlib.nullcontext():
                self._export(pl_module)
        trainer.strategy.barrier("lora_export")

    @rank_zero_only
    def _export(self, pl_module: pl.LightningModule) -> None:
        from lightning_qlora.peft_format import export_peft

        root = model_root(pl_module)
        name = getattr(getattr(root, "config", None), "_name_or_path", None) or None
        path = export_peft(root, Path(self.export_dir), self.config, base_model_name_or_path=name)
        rank_zero_info(f"LoRA: PEFT adapter written to {path}")


def refuse_sharded_compile(trainer: pl.Trainer) -> None:
    """Raise one line when ``compile_blocks`` meets a sharding strategy (FSDP1, FSDP2), where it is untested.

    Raises:
        ValueError: under Lightning's ``FSDPStrategy`` or ``ModelParallelStrategy`` (and so our FSDP strategies).
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"LoRA(compile_blocks=True) is not supported with {type(strategy).__name__}; "
            "set compile_blocks=False, or train on one device or with DDP (strategy='paged_ddp')"
        )


def use_atomic_checkpoint_io(trainer: pl.Trainer) -> None:
    """Swap Lightning's plain ``TorchCheckpointIO`` for :class:`~lightning_qlora.AtomicCheckpointIO`.

    Checkpoints are then written atomically and loaded with ``weights_only=True``; a custom checkpoint IO is kept.
    """
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lightning_qlora.checkpoint_io import AtomicCheckpointIO

    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def unwrapped_name(name: str) -> str:
    """A parameter name without the wrapper prefixes FSDP1 and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _quantization(trainer: pl.Trainer | None) -> dict[str, Any] | None:
    state = trainer.precision_plugin.state_dict() if trainer is not None else {}
    return state.get("quantization")


def refuse_other_base(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise when the base parts a checkpoint was written for differ from this model's.

    Raises:
        ValueError: naming what differs (see :func:`~lightning_qlora.fingerprint.describe_mismatch`).
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
        fingerprint: :func:`~lightning_qlora.fingerprint.base_fingerprint` of the module's base.
        config: the LoRA settings of this run.
        parts: :func:`~lightning_qlora.fingerprint.fingerprint_parts` of the module's base; when given (and the
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
