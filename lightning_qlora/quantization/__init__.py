"""NF4 + double quantization of linear layers with bitsandbytes (torch only; no Lightning)."""

from lightning_qlora.quantization.nf4 import QuantizationConfig
from lightning_qlora.quantization.shells import quantize_model

__all__ = ["QuantizationConfig", "quantize_model"]
