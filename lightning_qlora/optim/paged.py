"""bitsandbytes (paged) optimizers by name, and re-building a torch optimizer as its bitsandbytes equivalent."""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, SequentialLR

from lightning_qlora.utils.imports import bitsandbytes

# name -> (paged class, unpaged class) in bitsandbytes.optim; the unpaged one is used on CPU
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "paged_adamw_32bit": ("PagedAdamW32bit", "AdamW32bit"),
    "paged_adamw_8bit": ("PagedAdamW8bit", "AdamW8bit"),
    "paged_adam_32bit": ("PagedAdam32bit", "Adam32bit"),
    "paged_adam_8bit": ("PagedAdam8bit", "Adam8bit"),
    "paged_lion_32bit": ("PagedLion32bit", "Lion32bit"),
    "paged_lion_8bit": ("PagedLion8bit", "Lion8bit"),
    "paged_ademamix_32bit": ("PagedAdEMAMix32bit", "AdEMAMix32bit"),
    "paged_ademamix_8bit": ("PagedAdEMAMix8bit", "AdEMAMix8bit"),
    "adamw_32bit": ("AdamW32bit", "AdamW32bit"),
    "adamw_8bit": ("AdamW8bit", "AdamW8bit"),
}
_TORCH_ONLY_KEYS = {"foreach", "fused", "maximize", "capturable", "differentiable", "amsgrad", "decoupled_weight_decay"}
_FAMILY_OF_TORCH = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam"}


def check_optimizer_name(name: str) -> str:
    """Normalise and validate an optimizer name.

    Raises:
        ValueError: naming the closest known names.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, list(OPTIMIZERS), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(OPTIMIZERS)}"
        raise ValueError(f"unknown optimizer {name!r}; {hint}")
    return key


def optimizer_class(name: str, paged: bool) -> type[Optimizer]:
    """The bitsandbytes class for ``name``, paged or not."""
    bnb = bitsandbytes()

    paged_name, plain_name = OPTIMIZERS[check_optimizer_name(name)]
    return getattr(bnb.optim, paged_name if paged else plain_name)


def matching_name(optimizer: Optimizer, default: str) -> str:
    """The bitsandbytes name matching a torch optimizer's family, with ``default``'s bits (``adamw`` -> 8/32 bit)."""
    family = _FAMILY_OF_TORCH.get(type(optimizer))
    if family is None:
        return check_optimizer_name(default)
    bits = "8bit" if default.endswith("8bit") else "32bit"
    return check_optimizer_name(f"paged_{family}_{bits}" if default.startswith("paged") else f"{family}_{bits}")


def trainable_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy param groups keeping only parameters that require grad, and only keys bitsandbytes understands.

    Raises:
        ValueError: when no parameter at all is trainable.
    """
    out = []
    for group in groups:
        kept = {k: v for k, v in group.items() if k not in _TORCH_ONLY_KEYS and k != "params"}
        kept["params"] = [p for p in group["params"] if p.requires_grad]
        out.append(kept)
    if not any(g["params"] for g in out):
        raise ValueError(
            "the optimizer has no trainable parameters; add the LoRA callback (or unfreeze something) before training"
        )
    return out


def build_optimizer(name: str, params: Any, paged: bool, **hyperparameters: Any) -> Optimizer:
    """Instantiate the bitsandbytes optimizer ``name`` over ``params`` (tensors or param-group dicts)."""
    cls = optimizer_class(name, paged)
    if params and isinstance(params[0], dict):
        groups = [g for g in trainable_param_groups(params) if g["params"]]
    else:
        groups = trainable_param_groups([{"params": list(params)}])
    return cls(groups, **hyperparameters)


def convert_optimizer(optimizer: Optimizer, name: str, paged: bool) -> Optimizer:
    """Re-create ``optimizer`` as the matching bitsandbytes optimizer: same groups, lr, betas, eps, weight decay.

    Frozen parameters are dropped (they never get state); empty groups are kept so schedulers still line up.
    """
    bnb = bitsandbytes()

    if isinstance(optimizer, (bnb.optim.optimizer.Optimizer8bit, bnb.optim.optimizer.Optimizer2State)):
        return optimizer
    cls = optimizer_class(matching_name(optimizer, name), paged)
    _warn_on_changed_math(optimizer, cls)
    groups = trainable_param_groups(optimizer.param_groups)
    first = next(g for g in groups if g["params"])
    defaults = {k: first[k] for k in ("lr", "betas", "eps", "weight_decay") if k in first}
    new = cls([g for g in groups if g["params"]], **defaults)
    # keep one param group per original group (schedulers index them), even those left empty
    new.param_groups = [_fill(g, new.defaults) for g in groups]
    return new


def _warn_on_changed_math(optimizer: Optimizer, cls: type) -> None:
    """Warn where the bitsandbytes optimizer computes something else: decoupled weight decay for Adam, no AMSGrad."""
    groups = optimizer.param_groups
    if type(optimizer) is torch.optim.Adam and any(
        g.get("weight_decay", 0) and not g.get("decoupled_weight_decay", False) for g in groups
    ):
        warnings.warn(
            f"torch.optim.Adam's weight_decay is an L2 term added to the gradient, but {cls.__name__} decays the "
            "weights decoupled (as AdamW does); use torch.optim.AdamW in configure_optimizers to make that explicit",
            stacklevel=3,
        )
    if any(g.get("amsgrad", False) for g in groups):
        warnings.warn(f"{cls.__name__} has no AMSGrad variant; amsgrad=True is ignored", stacklevel=3)


def _fill(group: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    for key, value in defaults.items():
        group.setdefault(key, value)
    return group


def retarget_schedulers(lr_scheduler_configs: list, old: Optimizer, new: Optimizer) -> None:
    """Point every scheduler of ``old`` at ``new``, through torch's public scheduler API only.

    A scheduler reads and writes only ``scheduler.optimizer.param_groups``, so re-pointing its public ``optimizer``
    attribute moves the whole schedule: its state (``last_epoch``, ``base_lrs``, ...) is untouched, and ``new``'s
    groups were copied from ``old``'s, so they already carry the lr it set and the ``initial_lr`` it recorded.

    Args:
        lr_scheduler_configs: Lightning's scheduler configs (anything with a ``scheduler`` attribute).
        old: the optimizer ``configure_optimizers`` returned.
        new: its bitsandbytes replacement (may be ``old`` itself, then nothing changes).

    Raises:
        ValueError: for a ``SequentialLR`` or ``ChainedScheduler`` over ``old``: their sub-schedulers hold ``old``
            and torch offers no public way to reach them.
    """
    schedulers = [c.scheduler for c in lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) is old]
    if new is old or not schedulers:
        return
    for scheduler in schedulers:
        if isinstance(scheduler, (SequentialLR, ChainedScheduler)):
            raise ValueError(
                f"{type(scheduler).__name__} cannot follow the optimizer to {type(new).__name__}: its sub-schedulers "
                "keep updating the torch optimizer; write the schedule as one LambdaLR, or return a bitsandbytes "
                "optimizer from configure_optimizers (it is used as is)"
            )
    # torch only trusts the "optimizer.step() before scheduler.step()" order on optimizers a scheduler was built over;
    # building an identity schedule (x1.0, lr unchanged) over `new` lets torch install that tracking on `new` itself
    ConstantLR(new, factor=1.0, total_iters=0)
    for scheduler in schedulers:
        scheduler.optimizer = new


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of all tensors in ``optimizer``'s state (paged buffers included)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
