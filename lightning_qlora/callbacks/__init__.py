"""Lightning callbacks: LoRA, guards, summary, progress, resume, checkpoint, run lock, predictions, sample answers."""

from lightning_qlora.callbacks.checkpoint import ResumableCheckpoint
from lightning_qlora.callbacks.guards import NonFiniteGuard, OutOfMemoryAdvice
from lightning_qlora.callbacks.lora import LoRA
from lightning_qlora.callbacks.prediction_writer import JSONLPredictionWriter
from lightning_qlora.callbacks.progress import QLoRAProgressBar
from lightning_qlora.callbacks.resume import ExactResume
from lightning_qlora.callbacks.run_lock import RunLock
from lightning_qlora.callbacks.samples import SampleAnswers
from lightning_qlora.callbacks.summary import RunSummary

__all__ = [
    "ExactResume",
    "JSONLPredictionWriter",
    "LoRA",
    "NonFiniteGuard",
    "OutOfMemoryAdvice",
    "QLoRAProgressBar",
    "ResumableCheckpoint",
    "RunLock",
    "RunSummary",
    "SampleAnswers",
]
