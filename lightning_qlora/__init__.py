"""QLoRA for PyTorch Lightning: NF4 precision plugin, LoRA callback, paged-optimizer strategy, lm-eval hooks."""

from lightning_qlora.callback import LoRA
from lightning_qlora.checkpoint_io import AtomicCheckpointIO, ResumableCheckpoint
from lightning_qlora.compilation import compile_blocks
from lightning_qlora.data import InstructionDataModule
from lightning_qlora.distributed import PagedDDPStrategy
from lightning_qlora.footprint import Footprint, measure_footprint
from lightning_qlora.fsdp import QLoRAFSDPStrategy
from lightning_qlora.fsdp2 import QLoRAFSDP2Strategy
from lightning_qlora.guards import NonFiniteGuard, OutOfMemoryAdvice
from lightning_qlora.lora import LoRAConfig, LoRALinear
from lightning_qlora.memory_tracker import LiveTensorTracker
from lightning_qlora.model import CausalLM
from lightning_qlora.planner import MemoryPlan, plan_memory
from lightning_qlora.precision import NF4Precision
from lightning_qlora.quantization import QuantizationConfig, quantize_model
from lightning_qlora.resume import ExactResume
from lightning_qlora.strategy import PagedOptimizerStrategy
from lightning_qlora.summary import RunSummary

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "ExactResume",
    "NonFiniteGuard",
    "OutOfMemoryAdvice",
    "ResumableCheckpoint",
    "Footprint",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "LiveTensorTracker",
    "MemoryPlan",
    "NF4Precision",
    "PagedDDPStrategy",
    "PagedOptimizerStrategy",
    "QLoRAFSDP2Strategy",
    "QLoRAFSDPStrategy",
    "QuantizationConfig",
    "RunSummary",
    "CausalLM",
    "InstructionDataModule",
    "compile_blocks",
    "measure_footprint",
    "plan_memory",
    "quantize_model",
]
