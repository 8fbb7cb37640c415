"""Instruction and preference data: rows, prompt templates with response-only labels, resumable loading."""

from lightning_qlora.data.datamodule import InstructionDataModule
from lightning_qlora.data.preference import PreferenceDataModule

__all__ = ["InstructionDataModule", "PreferenceDataModule"]
