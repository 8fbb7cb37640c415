"""Instruction data: reading and validating rows, prompt templates with response-only labels, resumable loading."""

from lightning_qlora.data.datamodule import InstructionDataModule

__all__ = ["InstructionDataModule"]
