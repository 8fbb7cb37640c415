"""Lightning callbacks: LoRA, guards, run summary, progress bar, exact resume, resumable checkpoint, run lock."""

from lightning_qlora.callbacks.checkpoint import ResumableCheckpoint
from lightning_qlora.callbacks.guards import NonFiniteGuard, OutOfMemoryAdvice
from lightning_qlora.callbacks.lora import LoRA
from lightning_qlora.callbacks.progress import QLoRAProgressBar
from lightning_qlora.callbacks.resume import ExactResume
from lightning_qlora.callbacks.run_lock import RunLock
from lightning_qlora.callbacks.summary import RunSummary

__all__ = [
    "ExactResume",
    "LoRA",
    "NonFiniteGuard",
    "OutOfMemoryAdvice",
    "QLoRAProgressBar",
    "ResumableCheckpoint",
    "RunLock",
    "RunSummary",
]
