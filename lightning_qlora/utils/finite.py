"""Non-finite values: the error a NaN run ends with, and the check that keeps a poisoned adapter off the disk."""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf loss or gradient; the message names the step, batch and data rows."""


def _local_values(tensor: torch.Tensor) -> torch.Tensor:
    """Values of a sharded checkpoint tensor held by this rank (FSDP ``ShardedTensor``/``DTensor``), else the tensor."""
    if hasattr(tensor, "local_shards"):
        shards = [shard.tensor.reshape(-1) for shard in tensor.local_shards()]
        return torch.cat(shards) if shards else torch.zeros(0)
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` when a tensor holds NaN or inf (so a poisoned adapter never replaces a good one).

    Raises:
        NonFiniteError: naming the first non-finite tensor.
    """
    floats = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return
    flags = torch.stack([torch.isfinite(_local_values(t.detach())).all().to("cpu") for _, t in floats])
    if bool(flags.all()):
        return
    name = next(name for (name, _), ok in zip(floats, flags.tolist()) if not ok)
    raise NonFiniteError(
        f"refusing to write {what}: {name} holds NaN/inf values; nothing was written (the previous copy is intact); "
        "add NonFiniteGuard to stop training at the first non-finite loss"
    )
