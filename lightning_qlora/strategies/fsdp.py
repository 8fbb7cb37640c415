"""QLoRA under fully sharded data parallel: Lightning's ``FSDPStrategy`` (FSDP1) and torch's ``fully_shard`` (FSDP2).

FSDP shards floating-point tensors only, so the packed NF4 codes must be stored in a float dtype
(``NF4Precision(quant_storage="bf16")``, as Answer.AI's fsdp_qlora does): the bytes are just reinterpreted, two
4-bit codes per byte, and the ``QuantState`` (absmax constants) stays on the module, where bitsandbytes finds it
again after each all-gather. Units are wrapped so that each holds one dtype: every 4-bit layer, every adapter pair
(fp32 master weights) and every decoder block (norms) is its own unit. Frozen tensors never get gradients or
optimizer state; adapter-only checkpoints hold just the adapter shards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_qlora.lora.fingerprint import fingerprint_parts
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.plugins.precision import NF4Precision
from lightning_qlora.quantization.nf4 import is_4bit_linear
from lightning_qlora.strategies.ddp import check_identical_replicas
from lightning_qlora.utils.modules import decoder_blocks, model_root, trainable_names


def check_shardable(model: nn.Module) -> int:
    """Raise unless every 4-bit weight of ``model`` is stored in a floating dtype FSDP can shard; returns the count.

    Raises:
        ValueError: naming the first layer whose packed weight is stored as an integer dtype.
    """
    count = 0
    for name, module in model.named_modules():
        if is_4bit_linear(module) and module.weight.device.type != "meta":
            if not module.weight.is_floating_point():
                raise ValueError(
                    f"4-bit weight {name}.weight is stored as {module.weight.dtype}, which FSDP cannot shard "
                    "('Cannot flatten integer dtype tensors'); use NF4Precision(quant_storage=<compute dtype>, e.g. "
                    "'bf16')"
                )
            count += 1
    return count


def qlora_wrap_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that become their own FSDP unit: 4-bit layers, LoRA layers (adapters only) and decoder blocks.

    Each unit then holds tensors of a single dtype: packed 4-bit codes (plus the layer's bias), fp32 adapter
    master weights, or a block's norms.
    """
    chosen = [m for m in model.modules() if is_4bit_linear(m) or isinstance(m, LoRALinear)]
    return chosen + [m for m in decoder_blocks(model_root(model)) or [] if m not in chosen]


def qlora_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """An FSDP1 ``auto_wrap_policy`` that wraps :func:`qlora_wrap_modules` of ``model`` (by identity)."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    ids = {id(m) for m in qlora_wrap_modules(model)}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in ids)


def broadcast_trainable(model: nn.Module, src: int = 0, group: Any = None) -> int:
    """Copy rank ``src``'s trainable parameters (the adapters) to every rank in place; returns how many.

    Ranks build their adapters independently (LoRA's ``A`` is random): without this, sharding would stitch one
    full ``A`` together from different ranks' initialisations.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with torch.no_grad():
            for param in params:
                torch.distributed.broadcast(param.data, src=src, group=group)
    return len(params)


@contextlib.contextmanager
def unwrapped_full_module(wrapped: nn.Module) -> Iterator[None]:
    """Give every FSDP1 unit under ``wrapped`` its full parameters and swap it for the module it wraps, meanwhile.

    Names and types are then the plain model's (for exporting adapters). Collective: enter on every rank.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=False, recurse=True):
        swaps: list[tuple[nn.Module, str, nn.Module]] = []
        for parent in list(wrapped.modules()):
            for child_name, child in list(parent._modules.items()):
                if isinstance(child, FSDP):
                    swaps.append((parent, child_name, child))
        for parent, child_name, child in swaps:
            parent._modules[child_name] = child._fsdp_wrapped_module
        try:
            yield
        finally:
            for parent, child_name, child in swaps:
                parent._modules[child_name] = child


class QLoRAFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` for QLoRA: accepts :class:`~lightning_qlora.NF4Precision`, runs on CPU (gloo) too.

    Lightning's FSDP strategy only takes its own ``FSDPPrecision`` plugin (so bitsandbytes precision is rejected,
    pytorch-lightning #20855) and refuses CPU. This subclass takes ``NF4Precision`` (which must store the 4-bit codes in
    a float dtype: ``quant_storage="bf16"``), wraps each 4-bit layer, each adapter pair and each decoder block in its
    own unit (:func:`qlora_auto_wrap_policy`, unless you pass ``auto_wrap_policy``), checks that every rank quantized
    the same base, copies rank 0's adapters to all ranks before sharding, and keeps ``use_orig_params=True`` so frozen
    parameters get neither gradients nor optimizer state. Checkpoints default to ``state_dict_type="sharded"``: each
    rank writes its adapter shards (with the LoRA callback's ``adapter_only_checkpoints``, no base weight is ever
    gathered or written) and resuming reads back only what the checkpoint holds.

    Args:
        state_dict_type: ``"sharded"`` (default; a folder written by all ranks) or ``"full"`` (one file from rank 0;
            gathers every tensor, base included, to rank 0 before filtering: avoid for large models).
        check_replicas: compare the frozen base across ranks before sharding.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.FSDPStrategy` (``sharding_strategy``,
            ``cpu_offload``, ``auto_wrap_policy``, ``activation_checkpointing_policy``, ...).

    Raises:
        TypeError: for a precision plugin that is neither ``NF4Precision`` nor ``FSDPPrecision``.
        ValueError: at setup, for 4-bit weights stored as an integer dtype.
    """

    strategy_name = "qlora_fsdp"

    def __init__(self, state_dict_type: str = "sharded", check_replicas: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        super().__init__(state_dict_type=state_dict_type, **kwargs)  # type: ignore[arg-type]
        self.check_replicas = check_replicas
        self.base_fingerprint: dict[str, Any] | None = None
        """The frozen base's fingerprint parts, taken before sharding (the LoRA callback stores them in checkpoints)."""

    @property  # type: ignore[override]
    @override
    def precision_plugin(self) -> Precision:
        plugin = self._precision_plugin
        return plugin if plugin is not None else FSDPPrecision("32-true")

    @precision_plugin.setter
    @override
    def precision_plugin(self, precision_plugin: Precision | None) -> None:
        if precision_plugin is not None and not isinstance(precision_plugin, (NF4Precision, FSDPPrecision)):
            raise TypeError(
                f"QLoRAFSDPStrategy works with NF4Precision or FSDPPrecision, got {type(precision_plugin).__name__}; "
                "pass plugins=[NF4Precision(quant_storage='bf16')]"
            )
        self._precision_plugin = adopt_shardable_storage(precision_plugin)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Check the 4-bit storage and replicas, sync adapters from rank 0, then wrap (``device_id`` = CPU on CPU)."""
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        already_wrapped = any(isinstance(m, FSDP) for m in model.modules())
        self._prepare(model, choose_units=not already_wrapped)
        if already_wrapped or self.root_device.type != "cpu":
            return super()._setup_model(model)
        wrapped = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,  # torch's FSDP1 runs on CPU only when told the device explicitly
            **self.kwargs,
        )
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Set up as FSDP does, then make gradient-norm clipping use FSDP's all-rank norm."""
        super().setup(trainer)
        plugin = self.precision_plugin
        if isinstance(plugin, NF4Precision) and self.model is not None:
            root = self.model

            def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
                # the norm over all ranks' shards (torch's clip_grad_norm_ would see only this rank's shards)
                root.clip_grad_norm_(clip_val)

            plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    def _prepare(self, model: nn.Module, choose_units: bool) -> None:
        if isinstance(self.precision_plugin, NF4Precision):
            check_shardable(model)
        if self.check_replicas:
            check_identical_replicas(model, self.root_device)
        broadcast_trainable(model)
        self.base_fingerprint = base_fingerprint_parts(model, self.precision_plugin)
        if choose_units and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = qlora_auto_wrap_policy(model)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The model's state dict; sharded: only trainable tensors (the frozen base is never written)."""
        state = super().lightning_module_state_dict()
        if self._state_dict_type != "sharded" or self.lightning_module is None:
            return state
        if not frozen_base(self.lightning_module):
            return state
        trainable = trainable_names(self.lightning_module)
        return {k: v for k, v in state.items() if k in trainable}

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint that holds only some tensors (adapters) by reading just those keys."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        from torch.distributed.checkpoint import FileSystemReader

        saved = {k.split(".", 1)[1] for k in FileSystemReader(path).read_metadata().state_dict_metadata if "." in k}
        model = self.model
        original = model.state_dict

        def saved_only(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return {k: v for k, v in original(*args, **kwargs).items() if k in saved}

        model.state_dict = saved_only  # type: ignore[method-assign]
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            del model.state_dict

    def full_module_context(self) -> contextlib.AbstractContextManager:
        """Full, unwrapped parameters for the duration (exporting adapters). Collective: enter on every rank."""
        return unwrapped_full_module(self.model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"qlora_fsdp"`` for ``Trainer(strategy="qlora_fsdp")`` and the CLI."""
        strategy_registry.register(cls.strategy_name, cls, description="FSDP for QLoRA (NF4Precision, CPU or GPU)")


def frozen_base(module: nn.Module) -> bool:
    """Whether ``module`` trains only some of its parameters (adapters): checkpoints then hold just those.

    The frozen base never changes, so it is rebuilt from the model source on resume, never written.
    """
    flags = {p.requires_grad for p in module.parameters()}
    return flags == {True, False}


def adopt_shardable_storage(plugin: Precision | None) -> Precision | None:
    """Make an ``NF4Precision`` storing packed codes as ``uint8`` store them in its compute dtype (FSDP shards floats).

    Lets one recipe run on one GPU (``uint8``) and under FSDP (``--trainer.strategy=qlora_fsdp``) unchanged. The
    stored bytes are the same; only the dtype they are viewed as changes (it is part of the checkpoint fingerprint).
    """
    if isinstance(plugin, NF4Precision) and not plugin.config.quant_storage.is_floating_point:
        rank_zero_info(
            f"NF4Precision: storing 4-bit codes as {plugin.config.compute_dtype} instead of "
            f"{plugin.config.quant_storage} so FSDP can shard them"
        )
        plugin.config.quant_storage = plugin.config.compute_dtype
    return plugin


def base_fingerprint_parts(module: nn.Module, plugin: Precision) -> dict[str, Any]:
    """The base model's fingerprint parts while it is still whole on every rank (taken just before sharding)."""
    state = plugin.state_dict() if isinstance(plugin, NF4Precision) else {}
    return fingerprint_parts(model_root(module), state.get("quantization"))


QLoRAFSDPStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "QLoRAFSDPStrategy",
    "adopt_shardable_storage",
    "base_fingerprint_parts",
    "broadcast_trainable",
    "check_shardable",
    "frozen_base",
    "qlora_auto_wrap_policy",
    "qlora_wrap_modules",
    "unwrapped_full_module",
]
