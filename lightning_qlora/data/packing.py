"""Packed batches: several rows per sequence, positions restarting at every row, no attention across rows.

A pack is up to ``max_length`` tokens of whole rows, placed by best-fit decreasing (each row, longest first, goes
into the fullest pack it still fits). The batch carries ``position_ids`` (0, 1, … again at every row) and no
``attention_mask``: transformers then builds a block-diagonal causal mask from the positions (SDPA, eager, flex) or
runs flash-attention's variable-length kernel, so no token attends to another row. The label at each row's first
token is ignored, so no token learns to predict the next row; response-only labels are kept as they are.

Example:
    >>> sampler = PackedSampler([120, 90, 30, 200], max_length=256, seed=42)
    >>> list(sampler)  # [(3, 2), (0, 1)]: packs of row indices, in a seeded order
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from lightning_qlora.data.prompts import IGNORE_INDEX, DataError

__all__ = ["PackDataset", "PackedCollator", "PackedSampler", "plan_packs"]


def plan_packs(lengths: Sequence[int], max_length: int, seed: int) -> list[tuple[int, ...]]:
    """Place rows into packs of at most ``max_length`` tokens (best-fit decreasing), packs in a seeded order.

    Rows of equal length are taken in a seeded shuffle, so which rows share a pack changes with ``seed`` while
    the number of packs and their fill do not.

    Args:
        lengths: token count of each row (each ``<= max_length``).
        max_length: tokens per pack.
        seed: seed of the tie order and of the order of the packs.

    Returns:
        One tuple of row indices per pack, rows longest first.

    Raises:
        DataError: if a row is longer than ``max_length`` or empty.
    """
    bad = next((i for i, n in enumerate(lengths) if not 0 < n <= max_length), None)
    if bad is not None:
        raise DataError(
            f"row {bad} has {lengths[bad]} tokens; packing needs 1..max_length={max_length} tokens per row: "
            "truncate or drop it, or raise max_length"
        )
    generator = torch.Generator().manual_seed(seed)
    order = sorted(torch.randperm(len(lengths), generator=generator).tolist(), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # space left -> packs with that much space (a pack at most once)
    spaces: list[int] = []  # the keys of by_space, sorted: at most max_length of them, so bisect stays cheap
    for row in order:
        n = lengths[row]
        k = bisect.bisect_left(spaces, n)
        if k == len(spaces):
            packs.append([row])
            pack, left = len(packs) - 1, max_length - n
        else:
            space = spaces[k]
            pack = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
            packs[pack].append(row)
            left = space - n
        if left > 0:
            if left not in by_space:
                bisect.insort(spaces, left)
            by_space.setdefault(left, []).append(pack)
    shuffled = torch.randperm(len(packs), generator=generator).tolist()
    return [tuple(packs[i]) for i in shuffled]


class PackedSampler(Sampler[tuple[int, ...]]):
    """Yield packs of row indices (:func:`plan_packs`), a pure function of ``seed + epoch``.

    Args:
        lengths: token count of each row.
        max_length: tokens per pack.
        seed: base seed; epoch ``e`` uses ``seed + e`` (Lightning calls :meth:`set_epoch`).
    """

    def __init__(self, lengths: Sequence[int], max_length: int, seed: int = 42) -> None:
        self.lengths = list(lengths)
        self.max_length = max_length
        self.seed = seed
        self.epoch = 0
        self._plan: tuple[int, list[tuple[int, ...]]] | None = None  # (seed, packs): one plan per epoch, not per call

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose packs ``__iter__`` yields.

        Args:
            epoch: The epoch number.
        """
        self.epoch = epoch

    def _packs(self) -> list[tuple[int, ...]]:
        seed = self.seed + self.epoch
        if self._plan is None or self._plan[0] != seed:
            self._plan = (seed, plan_packs(self.lengths, self.max_length, seed))
        return self._plan[1]

    def __len__(self) -> int:
        return len(self._packs())  # the same every epoch: only the tie order changes with the seed

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self._packs())


class PackDataset(Dataset):
    """Rows looked up by pack: ``dataset[(3, 7)]`` is ``[rows[3], rows[7]]``.

    Args:
        rows: the tokenized rows.
    """

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pack: tuple[int, ...]) -> list[dict[str, Any]]:
        return [self.rows[i] for i in pack]


class PackedCollator:
    """Concatenate each pack's rows into one sequence; right-pad the packs of a batch to the same width.

    The batch holds ``input_ids``, ``labels`` (-100 at every row's first token and on padding), ``position_ids``
    (restarting at every row; the padding counts as one more row, which no real token can attend to), ``num_tokens``
    (tokens that are not padding) and, when rows carry their dataset position, ``row_index`` (every row of the
    batch, in order). No ``attention_mask``: transformers derives the block-diagonal mask from ``position_ids``.

    Args:
        pad_id: Padding token id.
        pad_to_multiple_of: Round the width up to a multiple of this.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, packs: Sequence[Sequence[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """Collate packs (lists of rows) into one batch of packed sequences."""
        width = max(sum(len(row["input_ids"]) for row in pack) for pack in packs)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(packs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(packs), width), dtype=torch.long)
        tokens, indices = 0, []
        for b, pack in enumerate(packs):
            start = 0
            for row in pack:
                n = len(row["input_ids"])
                input_ids[b, start : start + n] = torch.tensor(row["input_ids"], dtype=torch.long)
                labels[b, start + 1 : start + n] = torch.tensor(row["labels"][1:], dtype=torch.long)
                position_ids[b, start : start + n] = torch.arange(n)
                start += n
                indices.append(row.get("index"))
            position_ids[b, start:] = torch.arange(width - start)
            tokens += start
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        batch["num_tokens"] = torch.tensor(tokens, dtype=torch.long)
        if all(i is not None for i in indices):
            batch["row_index"] = torch.tensor(indices, dtype=torch.long)
        return batch
