"""``PagedOptimizerStrategy``: single-device training whose optimizer state lives in paged (unified) memory.

:class:`PagedOptimizerMixin` holds the optimizer conversion so the DDP strategy can share it.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_qlora.optim.paged import (
    build_optimizer,
    check_optimizer_name,
    convert_optimizer,
    optimizer_state_bytes,
    retarget_schedulers,
)
from lightning_qlora.utils.host_memory import keep_freed_host_memory


class PagedOptimizerMixin:
    """Strategy mixin that rebuilds the optimizer as a bitsandbytes paged one (single device and DDP strategies).

    Whatever ``configure_optimizers`` returns is rebuilt as the matching bitsandbytes optimizer (torch ``AdamW`` ->
    ``PagedAdamW``, ``Adam`` -> ``PagedAdam``; anything else -> ``optimizer``), keeping lr, betas, eps, weight
    decay, param groups and schedulers (each scheduler is re-pointed at the new optimizer; ``SequentialLR`` and
    ``ChainedScheduler`` cannot be, so return a bitsandbytes optimizer to use those); only trainable parameters get
    state. When the module does not define ``configure_optimizers``, the optimizer is built from ``optimizer`` and
    ``optimizer_kwargs``. On CPU, where paging does not exist, the unpaged equivalent is used with one warning, and
    (``reuse_host_memory``) glibc's ``malloc`` keeps freed memory for the next step instead of returning it to the
    kernel (:func:`~lightning_qlora.utils.host_memory.keep_freed_host_memory`). Call :meth:`_init_paged_optimizer`
    from the strategy's ``__init__``.
    """

    optimizer_name: str
    optimizer_kwargs: dict[str, Any]
    reuse_host_memory: bool

    def _init_paged_optimizer(
        self, optimizer: str, optimizer_kwargs: dict[str, Any] | None, reuse_host_memory: bool = True
    ) -> None:
        self.optimizer_name = check_optimizer_name(optimizer)
        self.optimizer_kwargs = {"lr": 2e-4, **(optimizer_kwargs or {})}
        self.reuse_host_memory = reuse_host_memory
        self._warned_cpu = False

    def setup_environment(self) -> None:
        """On CPU with ``reuse_host_memory``, keep freed host memory for reuse (one line says whether it could)."""
        super().setup_environment()  # type: ignore[misc]
        if not self.reuse_host_memory or self.root_device.type != "cpu":  # type: ignore[attr-defined]
            return
        name = type(self).__name__
        why_not = keep_freed_host_memory()
        if why_not is None:
            rank_zero_info(
                f"{name}: on cpu, malloc keeps freed memory for reuse (no page faults on each step's tensors; "
                "reuse_host_memory=False leaves glibc's defaults)"
            )
        else:
            rank_zero_info(f"{name}: freed host memory is returned to the kernel as usual: {why_not}")

    def connect(self, model: pl.LightningModule) -> None:
        """Give a module without ``configure_optimizers`` one that builds ``optimizer`` (Lightning needs the hook)."""
        super().connect(model)  # type: ignore[misc]
        current = getattr(model, "configure_optimizers", None)
        if getattr(current, "_paged_default", False) or not is_overridden("configure_optimizers", model):

            def configure_optimizers() -> torch.optim.Optimizer:
                params = list(model.parameters())
                return build_optimizer(self.optimizer_name, params, self.paged, **self.optimizer_kwargs)

            configure_optimizers._paged_default = True  # type: ignore[attr-defined]
            model.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    @property
    def paged(self) -> bool:
        """Whether paging is available (CUDA only)."""
        return self.root_device.type == "cuda"  # type: ignore[attr-defined]

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Let Lightning build the optimizers, then rebuild each as its bitsandbytes (paged) equivalent."""
        name = type(self).__name__
        if not self.paged and not self._warned_cpu:
            warnings.warn(
                f"{name}: paged optimizers need CUDA; on {self.root_device} '{self.optimizer_name}' "  # type: ignore[attr-defined]
                "runs unpaged (same math, no paging)",
                stacklevel=2,
            )
            self._warned_cpu = True
        super().setup_optimizers(trainer)  # type: ignore[misc]  # a module without the hook got one in `connect`
        converted = []
        for optimizer in self.optimizers:  # type: ignore[attr-defined]
            new = convert_optimizer(optimizer, self.optimizer_name, self.paged)  # bitsandbytes ones pass through
            retarget_schedulers(self.lr_scheduler_configs, optimizer, new)  # type: ignore[attr-defined]
            converted.append(new)
        self.optimizers = converted
        names = ", ".join(type(o).__name__ for o in self.optimizers)
        rank_zero_info(f"{name}: {names} over {self.trainable_parameter_count():,} trainable params")

    def trainable_parameter_count(self) -> int:
        """Parameters that have optimizer state."""
        return sum(p.numel() for o in self.optimizers for g in o.param_groups for p in g["params"])

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state right now (zero before the first step: state is created lazily)."""
        return sum(optimizer_state_bytes(o) for o in self.optimizers)


class PagedOptimizerStrategy(PagedOptimizerMixin, SingleDeviceStrategy):
    """Train on one device with a bitsandbytes paged optimizer, which absorbs memory spikes by paging its state.

    See :class:`PagedOptimizerMixin` for how the optimizer is rebuilt; :class:`~lightning_qlora.PagedDDPStrategy` is
    the same on several devices.

    Args:
        optimizer: name such as ``paged_adamw_32bit`` (default), ``paged_adamw_8bit``, ``paged_lion_8bit``.
        optimizer_kwargs: hyperparameters when building from the name (default ``lr=2e-4``, the paper's).
        device: the device to train on (default: the first GPU when the accelerator is CUDA, else CPU).
        reuse_host_memory: on CPU, have glibc's ``malloc`` keep freed memory for the next step instead of returning
            it to the kernel and faulting it in again (process-wide; no effect on GPUs).

    Raises:
        ValueError: for an unknown optimizer name.
    """

    strategy_name = "paged_optimizer"

    def __init__(
        self,
        optimizer: str = "paged_adamw_32bit",
        optimizer_kwargs: dict[str, Any] | None = None,
        device: str | None = None,
        reuse_host_memory: bool = True,
        **kwargs: Any,
    ) -> None:
        self._init_paged_optimizer(optimizer, optimizer_kwargs, reuse_host_memory)
        self._explicit_device = torch.device(device) if device is not None else None
        super().__init__(device=self._explicit_device or "cpu", **kwargs)

    @property
    @override
    def root_device(self) -> torch.device:
        if self._explicit_device is not None:
            return self._explicit_device
        if isinstance(self.accelerator, CUDAAccelerator):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"paged_optimizer"`` so ``Trainer(strategy="paged_optimizer")`` and the CLI find it."""
        strategy_registry.register(
            cls.strategy_name, cls, description="one device with a bitsandbytes paged optimizer (unpaged on CPU)"
        )


PagedOptimizerStrategy.register_strategies(StrategyRegistry)
