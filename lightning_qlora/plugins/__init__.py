"""Lightning plugins: ``NF4Precision`` (the 4-bit base) and ``AtomicCheckpointIO`` (checkpoints never half-written)."""

from lightning_qlora.plugins.checkpoint_io import AtomicCheckpointIO
from lightning_qlora.plugins.precision import NF4Precision

__all__ = ["AtomicCheckpointIO", "NF4Precision"]
