"""LoRA adapters (torch only): the layer, its fused autograd function, PEFT format, merging and the base fingerprint."""

from lightning_qlora.lora.layer import LoRAConfig, LoRALinear

__all__ = ["LoRAConfig", "LoRALinear"]
