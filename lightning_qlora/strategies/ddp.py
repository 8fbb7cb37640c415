"""``PagedDDPStrategy``: QLoRA under Lightning's DDP, each rank holding its own 4-bit replica of the frozen base.

Every rank quantizes the same weights itself, so the 4-bit base is never broadcast: before DDP wraps the model the
strategy compares a checksum of every frozen tensor (packed NF4 codes, their absmax/nested constants, norms,
embeddings) across ranks and refuses replicas that differ, then tells DDP to leave those tensors alone. DDP still
broadcasts the adapters from rank 0 (so a random LoRA ``A`` init is identical everywhere) and all-reduces only
parameters that require grad: the adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_qlora.strategies.single_device import PagedOptimizerMixin

_CHUNK = 1 << 22  # bytes hashed per step: bounds the temporary int64 buffers to 32 MiB per tensor


def frozen_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every frozen parameter of ``module`` and, for 4-bit weights, the tensors of their quantization state.

    Yields:
        ``(name, tensor)`` pairs: ``<param>`` for the parameter itself and ``<param>.quant_state.<field>`` for the
        absmax constants, the nested (double-quant) absmax, offset and code table.
    """
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        yield name, param.detach()
        state = getattr(param, "quant_state", None)
        if state is None:
            continue
        for field in ("absmax", "offset", "code"):
            value = getattr(state, field, None)
            if isinstance(value, torch.Tensor):
                yield f"{name}.quant_state.{field}", value
        nested = getattr(state, "state2", None)
        for field in ("absmax", "code"):
            value = getattr(nested, field, None)
            if isinstance(value, torch.Tensor):
                yield f"{name}.quant_state.state2.{field}", value


def tensor_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of ``tensor``'s raw bytes (int64, on its device): equal bits give equal sums.

    ``sum_i byte_i · (1 + i mod 65521)`` over the bytes in memory order, so reordered or changed bytes (NaN bit
    patterns of packed codes included) change it; computed in chunks, without copying the tensor to the host.
    """
    data = tensor.detach().contiguous().reshape(-1)
    raw = data.view(torch.uint8) if data.numel() else data.to(torch.uint8)
    total = torch.zeros((), dtype=torch.int64, device=raw.device)
    weights = (torch.arange(min(_CHUNK, raw.numel()), device=raw.device, dtype=torch.int64) % 65521) + 1
    for start in range(0, raw.numel(), _CHUNK):
        chunk = raw[start : start + _CHUNK].to(torch.int64)
        total += (chunk * weights[: chunk.numel()]).sum()
    return total


def replica_checksums(module: nn.Module, device: torch.device | None = None) -> tuple[list[str], torch.Tensor]:
    """Names and checksums (one int64 each) of :func:`frozen_tensors`, the sums gathered on ``device``."""
    names, sums = [], []
    for name, tensor in frozen_tensors(module):
        if tensor.device.type == "meta":
            continue
        names.append(name)
        sums.append(tensor_checksum(tensor).to(device or tensor.device))
    values = torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64, device=device)
    return names, values


def _all_gather(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    import torch.distributed as dist

    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor, group=group)
    return torch.stack(out)


def check_identical_replicas(module: nn.Module, device: torch.device | None = None, group: Any = None) -> int:
    """Raise unless every rank holds bit-identical frozen tensors (4-bit codes and constants included).

    A collective: call it on every rank of ``group`` (default: the world), with the process group initialised; a
    no-op returning 0 when it is not.

    Args:
        module: the model about to be wrapped.
        device: where the checksums are gathered (the rank's device: CUDA under NCCL); default the tensors' own.
        group: the process group (default: the world).

    Returns:
        How many frozen tensors were compared.

    Raises:
        RuntimeError: naming the first tensor whose bits differ between rank 0 and another rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    names, sums = replica_checksums(module, device)
    counts = _all_gather(torch.tensor([len(names)], device=sums.device), group).reshape(-1)
    if not bool((counts == counts[0]).all()):
        raise RuntimeError(
            f"ranks hold different numbers of frozen tensors ({counts.tolist()}); every rank must build the same "
            "model (check configure_model does not depend on the rank)"
        )
    gathered = _all_gather(sums, group).reshape(len(counts), -1)
    differ = (gathered != gathered[0]).any(dim=0)
    if bool(differ.any()):
        index = int(differ.nonzero()[0])
        ranks = [r for r in range(len(counts)) if gathered[r, index] != gathered[0, index]]
        raise RuntimeError(
            f"the frozen base differs between ranks: {names[index]} on rank {ranks[0]} is not rank 0's "
            f"({int(differ.sum())} tensors differ); load the same checkpoint on every rank, or call "
            "lightning.seed_everything(...) before building a randomly initialised base"
        )
    return len(names)


class PagedDDPStrategy(PagedOptimizerMixin, DDPStrategy):
    """Distributed data parallel QLoRA: a 4-bit replica per rank, adapters all-reduced, paged optimizer per rank.

    Each rank quantizes its own copy of the base (through :class:`~lightning_qlora.NF4Precision`); the copies are
    checked to be bit-identical across ranks and excluded from DDP's start-up broadcast, so a 70B base is never sent
    over the network. Frozen tensors have ``requires_grad=False``, so DDP's gradient buckets hold only the trainable
    adapters. The optimizer is rebuilt as a bitsandbytes paged one on every rank (see
    :class:`~lightning_qlora.strategies.single_device.PagedOptimizerMixin`; unpaged on CPU). Checkpoints are written
    by rank 0 only, atomically; the LoRA callback's PEFT export is rank-0 only as well.

    Args:
        optimizer: bitsandbytes optimizer name (``paged_adamw_32bit`` by default, ``paged_adamw_8bit``, ...).
        optimizer_kwargs: hyperparameters when the module has no ``configure_optimizers`` (default ``lr=2e-4``).
        check_replicas: compare the frozen base across ranks before training (a few int64 sums per tensor).
        reuse_host_memory: on CPU, have glibc's ``malloc`` keep freed memory for the next step (see
            :class:`~lightning_qlora.PagedOptimizerStrategy`).
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``find_unused_parameters``,
            ``process_group_backend``, ``timeout``, ...).

    Raises:
        ValueError: for an unknown optimizer name.
    """

    strategy_name = "paged_ddp"

    def __init__(
        self,
        optimizer: str = "paged_adamw_32bit",
        optimizer_kwargs: dict[str, Any] | None = None,
        check_replicas: bool = True,
        reuse_host_memory: bool = True,
        **kwargs: Any,
    ) -> None:
        self._init_paged_optimizer(optimizer, optimizer_kwargs, reuse_host_memory)
        self.check_replicas = check_replicas
        self.compared_tensors = 0
        """How many frozen tensors :func:`check_identical_replicas` compared at the last setup."""
        super().__init__(**kwargs)

    @override
    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        """Check the replicas, keep frozen tensors out of DDP's broadcast, then wrap in DDP."""
        if self.check_replicas:
            self.compared_tensors = check_identical_replicas(model, self.root_device)
        frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | frozen
        model._ddp_params_and_buffers_to_ignore = sorted(ignored)  # type: ignore[assignment]
        return super()._setup_model(model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"paged_ddp"`` so ``Trainer(strategy="paged_ddp")`` and the CLI find it."""
        strategy_registry.register(
            cls.strategy_name, cls, description="DDP with per-rank 4-bit replicas and a bitsandbytes paged optimizer"
        )


PagedDDPStrategy.register_strategies(StrategyRegistry)


__all__ = [
    "PagedDDPStrategy",
    "check_identical_replicas",
    "frozen_tensors",
    "replica_checksums",
    "tensor_checksum",
]
