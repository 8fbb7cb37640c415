"""QLoRA for PyTorch Lightning: NF4 precision plugin, LoRA callback, paged-optimizer strategy, lm-eval hooks."""

from lightning_qlora.callback import LoRA
from lightning_qlora.data import InstructionDataModule
from lightning_qlora.footprint import Footprint, measure_footprint
from lightning_qlora.lora import LoRAConfig, LoRALinear
from lightning_qlora.model import CausalLM
from lightning_qlora.precision import NF4Precision
from lightning_qlora.quantization import QuantizationConfig, quantize_model
from lightning_qlora.strategy import PagedOptimizerStrategy
from lightning_qlora.summary import RunSummary

__version__ = "0.1.0"

__all__ = [
    "Footprint",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "NF4Precision",
    "PagedOptimizerStrategy",
    "QuantizationConfig",
    "RunSummary",
    "CausalLM",
    "InstructionDataModule",
    "measure_footprint",
    "quantize_model",
]
