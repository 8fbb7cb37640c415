"""QLoRA for PyTorch Lightning: NF4 precision plugin, LoRA callback, paged-optimizer strategy, lm-eval hooks."""

from lightning_qlora.callbacks import (
    ExactResume,
    JSONLPredictionWriter,
    LoRA,
    NonFiniteGuard,
    OutOfMemoryAdvice,
    QLoRAProgressBar,
    ResumableCheckpoint,
    RunLock,
    RunSummary,
    SampleAnswers,
)
from lightning_qlora.data import InstructionDataModule, PreferenceDataModule
from lightning_qlora.lora import LoRAConfig, LoRALinear
from lightning_qlora.memory import Footprint, LiveTensorTracker, MemoryPlan, measure_footprint, plan_memory
from lightning_qlora.models import CausalLM, PreferenceLM, compile_blocks
from lightning_qlora.plugins import AtomicCheckpointIO, NF4Precision
from lightning_qlora.quantization import QuantizationConfig, quantize_model
from lightning_qlora.strategies import (
    PagedDDPStrategy,
    PagedOptimizerStrategy,
    QLoRAFSDP2Strategy,
    QLoRAFSDPStrategy,
)
from lightning_qlora.utils.finite import NonFiniteError

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "CausalLM",
    "ExactResume",
    "Footprint",
    "InstructionDataModule",
    "JSONLPredictionWriter",
    "LiveTensorTracker",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "MemoryPlan",
    "NF4Precision",
    "NonFiniteError",
    "NonFiniteGuard",
    "OutOfMemoryAdvice",
    "PagedDDPStrategy",
    "PagedOptimizerStrategy",
    "PreferenceDataModule",
    "PreferenceLM",
    "QLoRAProgressBar",
    "QLoRAFSDP2Strategy",
    "QLoRAFSDPStrategy",
    "QuantizationConfig",
    "ResumableCheckpoint",
    "RunLock",
    "RunSummary",
    "SampleAnswers",
    "compile_blocks",
    "measure_footprint",
    "plan_memory",
    "quantize_model",
]
