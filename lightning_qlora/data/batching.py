"""Padded batches: length-grouped sampling and right-padding collation (the unpacked path of the data module)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from lightning_qlora.data.prompts import IGNORE_INDEX

__all__ = ["InstructionCollator", "LengthGroupedSampler"]


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, cut into mega-batches of ``mega_batch_mult * batch_size``, sort each by length (longest first).

    Consecutive ``batch_size`` chunks then hold examples of similar length, which cuts padding. The order is a
    pure function of ``seed + epoch``; the longest example is moved to the very first batch so memory problems
    show up at step one (like Hugging Face's ``LengthGroupedSampler``).

    Args:
        lengths: Token count of each example.
        batch_size: Batch size of the DataLoader using this sampler.
        seed: Base seed.
        mega_batch_mult: Mega-batch size in batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, mega_batch_mult: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (Lightning calls this each epoch).

        Args:
            epoch: The epoch number.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.mega_batch_mult * self.batch_size
        megas = [sorted(order[i : i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(order), size)]
        if megas:
            longest = max(range(len(megas)), key=lambda m: self.lengths[megas[m][0]])
            megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
        return iter([i for mega in megas for i in mega])


class InstructionCollator:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100, and build the attention mask.

    Examples that carry their dataset position (``index``) also give the batch a ``row_index`` tensor.

    Args:
        pad_id: Padding token id.
        pad_to_multiple_of: Round the padded length up to a multiple of this.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate examples into a batch of ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if all("index" in e for e in examples):  # positions in the dataset, to name rows in error messages
            batch["row_index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        return batch
