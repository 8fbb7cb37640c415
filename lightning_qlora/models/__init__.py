"""Models: ``CausalLM`` (a LightningModule around transformers), model sources, the loss, checkpointing, compiling."""

from lightning_qlora.models.causal_lm import CausalLM
from lightning_qlora.models.compilation import compile_blocks
from lightning_qlora.models.preference import PreferenceLM

__all__ = ["CausalLM", "PreferenceLM", "compile_blocks"]
