"""``LoRA``: a Lightning callback that adds adapters to all linear layers and freezes the backbone."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_qlora.callbacks.base_check import CHECKPOINT_KEY, BaseCheck
from lightning_qlora.callbacks.fit_outputs import (
    count_optimizer_steps,
    existing_adapter,
    keep_existing_output,
    optimizer_steps_this_fit,
)
from lightning_qlora.lora.experts import inject_expert_lora
from lightning_qlora.lora.layer import LoRAConfig, inject_lora, lora_modules, mark_only_lora_trainable
from lightning_qlora.lora.loftq import checkpoint_tensors, loftq_init_model
from lightning_qlora.lora.peft_format import export_peft
from lightning_qlora.lora.peft_modules import SavedModules, saved_modules, saved_modules_layout
from lightning_qlora.models.checkpointing import CheckpointMode, checkpoint_kwargs, enable_gradient_checkpointing
from lightning_qlora.models.compilation import compile_blocks, graph_break_counts, graph_break_report
from lightning_qlora.models.sources import safetensors_files
from lightning_qlora.plugins.checkpoint_io import use_atomic_checkpoint_io
from lightning_qlora.utils.atomic import DiskFullError, is_disk_full
from lightning_qlora.utils.finite import check_finite_tensors
from lightning_qlora.utils.modules import model_root, trainable_names

__all__ = ["CHECKPOINT_KEY", "LoRA", "refuse_sharded_compile"]


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
            place (regional compilation, :func:`~lightning_qlora.models.compilation.compile_blocks`): one compile serves
            every layer; fuses the elementwise work around the matmuls. The first step pays the compile (tens of
            seconds). Single device and DDP; refused under the FSDP strategies.
        compile_kwargs: passed to ``torch.compile`` for each block (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``,
            ``{"dynamic": False}``, ``{"backend": "aot_eager"}`` to check graph capture without code generation).
        fused: train through the fused LoRA autograd functions (save only ``x`` and ``x·Aᵀ``; see
            :func:`~lightning_qlora.lora.function.fused_lora_linear`); False uses the plain composition.
        adapter_only_checkpoints: save only trainable tensors in Lightning checkpoints (written atomically and loaded
            with ``weights_only=True``: Lightning's default checkpoint IO is swapped for ``AtomicCheckpointIO``).
        export_dir: if set, write a PEFT adapter (``adapter_config.json`` + safetensors) here at the end of fit.
        init: ``"zeros"`` (B = 0: the model starts as its base) or ``"loftq"``: A and B from the truncated SVD of
            each 4-bit layer's rounding error ``W − deq(Q)``, ``W`` read from the base checkpoint
            (:mod:`~lightning_qlora.lora.loftq`); the exported adapter then belongs on the same 4-bit base.

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
        compile_kwargs: dict[str, Any] | None = None,
        fused: bool = True,
        adapter_only_checkpoints: bool = True,
        export_dir: str | None = None,
        init: Literal["zeros", "loftq"] = "zeros",
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
            init=init,
        )
        self.trainable_modules = list(trainable_modules or [])
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_mode = checkpoint_mode
        self.checkpoint_every_n_layers = checkpoint_every_n_layers
        self.compile_blocks = compile_blocks
        self.compile_kwargs = dict(compile_kwargs or {})
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.export_dir = export_dir
        self.injected: list[str] = []
        self.base_check = BaseCheck(self.config)
        """Writes the base model's fingerprint into checkpoints and refuses checkpoints of another base."""
        self.trainable_params = 0
        self._graph_breaks_before: dict[str, int] | None = None  # counts at train start, while a check is due

    # The path of a run: setup (checkpoint IO, base check, adapters once the model exists) -> train start (codes
    # check, train mode) -> checkpoints (adapter-only, fingerprinted) -> fit end (PEFT export).
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.strict_loading = False  # adapter-only checkpoints; the base check covers what matters
        if self.compile_blocks:
            refuse_sharded_compile(trainer)
        use_atomic_checkpoint_io(trainer)
        if stage == "fit":
            count_optimizer_steps(trainer)  # at fit end: an untrained export must not replace a trained adapter
        self.base_check.attach(pl_module)
        when_built(pl_module, self.apply)

    def apply(self, pl_module: nn.Module) -> list[str]:
        """Inject adapters (idempotent), freeze the rest, then checkpoint and compile the blocks; returns new names."""
        names = inject_lora(pl_module, self.config) + inject_expert_lora(pl_module, self.config)
        self.injected += names
        self.trainable_params = mark_only_lora_trainable(pl_module, self.trainable_modules)
        root = model_root(pl_module)
        if self.trainable_modules and self.export_dir:  # now, not after training: the PEFT export must hold them
            try:
                saved_modules_layout(root)
            except ValueError as err:
                raise ValueError(f"LoRA(trainable_modules={self.trainable_modules}) with export_dir: {err}") from err
        if self.config.init == "loftq" and names:
            loftq_from_checkpoint(root)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(root, self.checkpoint_mode, self.checkpoint_every_n_layers)
        if self.compile_blocks:
            compile_blocks(root, **self.compile_kwargs)
        if names:
            rank_zero_info(f"LoRA: adapters on {len(self.injected)} layers, {self.trainable_params:,} trainable params")
        return names

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(True for _ in lora_modules(pl_module)):
            self.apply(pl_module)  # built lazily somewhere Lightning does not hook: still inject before training

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.base_check.check_codes(trainer, pl_module)
        # transformers' from_pretrained returns eval mode, which silently turns its checkpointing (and dropout) off
        pl_module.train()
        self._graph_breaks_before = graph_break_counts() if self.compile_blocks else None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.base_check.check_codes(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._graph_breaks_before is not None:  # after the first step: the blocks have compiled
            report = graph_break_report(self._graph_breaks_before)
            self._graph_breaks_before = None
            if report is not None:
                rank_zero_warn(f"LoRA(compile_blocks=True): {report}")

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        trainable = trainable_names(pl_module)
        if self.adapter_only_checkpoints:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        check_finite_tensors(
            {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}, "a checkpoint of the adapters"
        )
        checkpoint[CHECKPOINT_KEY] = self.base_check.metadata(trainer, pl_module, trainable)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.base_check.check(trainer, pl_module, checkpoint)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export the PEFT adapter to ``export_dir``, unless this fit trained no optimizer step and one is there.

        An existing adapter is kept (one warning line) after a fit of 0 steps (``max_steps=0``, a finished run
        resumed), unless ``overwrite`` is set on this callback (``lightning-qlora fit --overwrite true`` sets it).

        Raises:
            DiskFullError: if the device fills up; names ``export_dir`` and about the bytes the adapter needs (the
                adapter already there is kept).
        """
        steps = optimizer_steps_this_fit(trainer, stop=True)
        if self.export_dir:
            overwrite = bool(getattr(self, "overwrite", False))
            target = existing_adapter(self.export_dir)
            if target is None or not keep_existing_output(trainer, target, "LoRA adapter", overwrite, steps):
                full = getattr(trainer.strategy, "full_module_context", None)  # sharded strategies gather adapters
                with full() if full is not None else contextlib.nullcontext():
                    # sharded: trained modules are gathered on every rank (a collective); otherwise rank 0 reads them
                    saved = saved_modules(model_root(pl_module)) if full is not None else None
                    self._export(pl_module, saved)
        trainer.strategy.barrier("lora_export")

    @rank_zero_only
    def _export(self, pl_module: pl.LightningModule, saved: SavedModules | None) -> None:
        root = model_root(pl_module)
        name = getattr(getattr(root, "config", None), "_name_or_path", None) or None
        try:
            path = export_peft(root, Path(self.export_dir), self.config, base_model_name_or_path=name, saved=saved)
        except Exception as err:  # safetensors wraps ENOSPC in its own error
            if not is_disk_full(err):
                raise
            needed = sum(p.numel() * p.element_size() for p in root.parameters() if p.requires_grad)
            raise DiskFullError(Path(self.export_dir), needed) from err
        rank_zero_info(f"LoRA: PEFT adapter written to {path}")


def loftq_from_checkpoint(root: nn.Module) -> None:
    """LoftQ-initialise ``root``'s adapters from the weights in its checkpoint folder (``config._name_or_path``).

    Raises:
        ValueError: if the model has no checkpoint folder with safetensors, or a 4-bit layer's weight is missing.
    """
    source = getattr(getattr(root, "config", None), "_name_or_path", None)
    if not source or not Path(source).is_dir():
        raise ValueError(
            f"LoRA(init='loftq') reads W from the base checkpoint, but the model's source {source!r} is not a local "
            "folder; load the model from a folder (CausalLM does) or use init='zeros'"
        )
    done, skipped = loftq_init_model(root, checkpoint_tensors(safetensors_files(Path(source))))
    if skipped:
        rank_zero_warn(
            f"LoRA(init='loftq'): {len(skipped)} adapted layers (e.g. {skipped[0]}) have no 4-bit base, so no rounding "
            "error to start from; they keep the zero init (use NF4Precision, loading the model in configure_model)"
        )
    rank_zero_info(f"LoRA: LoftQ init of {len(done)} layers from {source}")


def when_built(pl_module: pl.LightningModule, apply: Callable[[nn.Module], Any]) -> None:
    """Run ``apply`` on ``pl_module`` now if its network has linear layers, else right after its ``configure_model``."""
    if any(isinstance(m, nn.Linear) for m in pl_module.modules()):
        apply(pl_module)
    original = pl_module.configure_model
    if getattr(original, "_lora_wrapped", False):
        return

    @functools.wraps(original)
    def configure_model_then_lora() -> None:
        original()
        if any(isinstance(m, nn.Linear) for m in pl_module.modules()):
            apply(pl_module)

    configure_model_then_lora._lora_wrapped = True  # type: ignore[attr-defined]
    pl_module.configure_model = configure_model_then_lora  # type: ignore[method-assign]


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
