"""QLoRA under FSDP2 (torch's per-parameter ``fully_shard``), directly or through Lightning's ``ModelParallelStrategy``.

FSDP2 shards every parameter on dim 0 as a ``DTensor`` and all-gathers a unit's parameters before its forward. The
packed NF4 codes (stored in a float dtype, ``quant_storage="bf16"``) are only ever copied byte for byte: their units
get a mixed-precision policy that never casts them, because a float conversion may quiet or canonicalise the NaN
bit patterns that packed codes form when read as bf16 (bitsandbytes #1945). Units hold one dtype each (4-bit layer,
adapter pair, decoder block, root), as with FSDP1 (see :mod:`lightning_qlora.strategies.fsdp`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from typing_extensions import override

from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.quantization.nf4 import is_4bit_linear
from lightning_qlora.strategies.ddp import check_identical_replicas
from lightning_qlora.strategies.fsdp import (
    adopt_shardable_storage,
    base_fingerprint_parts,
    broadcast_trainable,
    check_shardable,
    frozen_base,
)
from lightning_qlora.utils.modules import decoder_blocks, model_root, trainable_names


def fully_shard_qlora(
    model: nn.Module,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    shard_root: bool = True,
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` bottom-up: each 4-bit layer, each LoRA layer, each decoder block, then ``model``.

    Args:
        model: a quantized model with adapters injected (adapters must exist before sharding).
        mesh: the 1-D data-parallel ``DeviceMesh`` (default: all ranks).
        reshard_after_forward: free the gathered weights after each unit's forward (re-gathered in backward).
        mp_policy: a ``MixedPrecisionPolicy`` for adapters, blocks and the root (e.g. ``param_dtype=torch.bfloat16``
            for fp32 adapters); the 4-bit units always get one that never casts their packed codes.
        shard_root: also shard ``model`` itself (its remaining parameters: embeddings, final norm, head). Its forward
            must then be what is called (it gathers those parameters); leave it False when something else calls
            the submodules.

    Returns:
        ``model``, now an FSDP2 module (its class is swapped in place; names and ``isinstance`` checks still work).

    Raises:
        ValueError: for 4-bit weights stored as an integer dtype (see
            :func:`~lightning_qlora.strategies.fsdp.check_shardable`).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_shardable(model)
    common = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    four_bit = [m for m in model.modules() if is_4bit_linear(m)]
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    blocks = [m for m in decoder_blocks(model_root(model)) or [] if m not in four_bit and m not in adapters]
    for module in four_bit:
        fully_shard(module, mp_policy=MixedPrecisionPolicy(), **common)  # packed codes: all-gathered, never cast
    for module in [*adapters, *blocks]:
        fully_shard(module, mp_policy=policy, **common)
    if shard_root:
        fully_shard(model, mp_policy=policy, **common)
    return model


class QLoRAFSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2 data parallelism for QLoRA, sharding the model itself.

    Lightning's ``ModelParallelStrategy`` expects ``configure_model`` to shard the model, but the LoRA callback adds
    adapters after ``configure_model`` and :class:`~lightning_qlora.NF4Precision` may quantize after it too, so here the
    strategy shards once both are done (:func:`fully_shard_qlora` over all ranks), after checking that every rank
    quantized the same base and copying rank 0's adapters to all ranks. Checkpoints are distributed (a folder, each
    rank writing its shards); with the LoRA callback's ``adapter_only_checkpoints`` only adapter shards and their
    optimizer state are written and read back.

    Args:
        reshard_after_forward: see :func:`fully_shard_qlora`.
        mp_policy: see :func:`fully_shard_qlora`.
        save_distributed_checkpoint: a sharded folder (default) or one full file gathered on rank 0.
        check_replicas: compare the frozen base across ranks before sharding.
        process_group_backend: ``"nccl"``/``"gloo"`` (default: by device).
        timeout: collective timeout.
    """

    strategy_name = "qlora_fsdp2"

    def __init__(
        self,
        reshard_after_forward: bool = True,
        mp_policy: Any = None,
        save_distributed_checkpoint: bool = True,
        check_replicas: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.reshard_after_forward = reshard_after_forward
        self.mp_policy = mp_policy
        self.check_replicas = check_replicas
        self.base_fingerprint: dict[str, Any] | None = None
        """The frozen base's fingerprint parts, taken before sharding (the LoRA callback stores them in checkpoints)."""

    @property
    @override
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    @override
    def precision_plugin(self, precision_plugin: Precision | None) -> None:
        self._precision_plugin = adopt_shardable_storage(precision_plugin)

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the same dimension
        super().setup_environment()

    @override
    def model_to_device(self) -> None:
        """Move what is left to the device, then shard (after LoRA injection and quantization)."""
        super().model_to_device()
        model = self.model
        assert model is not None
        if any(type(m).__name__.startswith("FSDP") for m in model.modules()):
            return  # already sharded (configure_model did it, or a second setup)
        if self.check_replicas:
            check_identical_replicas(model, self.root_device)
        broadcast_trainable(model)
        self.base_fingerprint = base_fingerprint_parts(model, self.precision_plugin)
        fully_shard_qlora(
            model,
            mesh=self.device_mesh["data_parallel"],
            reshard_after_forward=self.reshard_after_forward,
            mp_policy=self.mp_policy,
        )

    # The LightningModule is the FSDP2 root: its step methods run through its ``__call__`` (as Lightning does for
    # DDP/FSDP1 wrappers) so the root's hooks gather the parameters outside the inner units (embeddings, final norm,
    # head) for the whole step, whichever of the model's submodules or weights the step uses.
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "training_step", *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "predict_step", *args, **kwargs)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The model's state dict; distributed and adapter-only: only trainable tensors (no base shard is written)."""
        state = super().lightning_module_state_dict()
        module = self.lightning_module
        if not self._save_distributed_checkpoint or module is None or not frozen_base(module):
            return state
        trainable = trainable_names(module)
        return {k: v for k, v in state.items() if k in trainable}

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a distributed checkpoint that holds only some tensors (the adapters): read just those keys."""
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if not path.is_dir() or module is None or getattr(module, "strict_loading", True):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in saved}
        load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[key])
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    def full_module_context(self) -> Any:
        """Full adapter tensors for the duration (exporting them): unshard every unit. Collective: every rank."""
        return unsharded(self.model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"qlora_fsdp2"`` for ``Trainer(strategy="qlora_fsdp2")`` and the CLI."""
        strategy_registry.register(cls.strategy_name, cls, description="FSDP2 (fully_shard) for QLoRA")


class unsharded:  # noqa: N801 - used like a function: ``with unsharded(model): ...``
    """Context manager: all-gather every FSDP2 unit of ``model`` (parameters become full tensors), reshard on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.units = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]

    def __enter__(self) -> None:
        for unit in self.units:
            unit.unshard()

    def __exit__(self, *exc: Any) -> None:
        for unit in reversed(self.units):
            unit.reshard()


QLoRAFSDP2Strategy.register_strategies(StrategyRegistry)

__all__ = ["QLoRAFSDP2Strategy", "fully_shard_qlora", "unsharded"]
