"""Instruction-tuning data for QLoRA: Alpaca/chat rows, response-only labels, length-grouped or packed batches.

Example:
    >>> dm = InstructionDataModule("pkg://zaragoza_construction_faq/data/faq-en-alpaca.jsonl", max_length=256)
    >>> dm.connect(tokenizer)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))  # input_ids, attention_mask, labels (-100 on prompts and padding)

With ``packing=True`` each training batch holds ``batch_size`` sequences of up to ``max_length`` tokens, each
several whole rows (:mod:`lightning_qlora.data.packing`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_qlora.data.batching import InstructionCollator, LengthGroupedSampler
from lightning_qlora.data.loader import ResumableDataLoader, trainer_progress
from lightning_qlora.data.packing import PackDataset, PackedCollator, PackedSampler
from lightning_qlora.data.prompts import IGNORE_INDEX, DataError, PromptEncoder, detect_format, normalize_row, read_rows
from lightning_qlora.utils.errors import first_line

__all__ = ["DataError", "InstructionCollator", "InstructionDataModule", "LengthGroupedSampler", "read_rows"]

_CHUNK = 512


class InstructionDataModule(LightningDataModule):
    """Instruction-tuning data: Alpaca or chat rows, tokenized once, trained on responses only.

    Args:
        path: Training data: a local ``.json`` (list of rows) or ``.jsonl`` file, a folder of them (read in
            sorted order, each validated as alone), ``pkg://package/rel/path`` for data shipped in an installed
            package, or a ``datasets`` hub name (``name`` or ``name:split``).
        val_path: Validation data in the same forms; when None, ``val_split`` of ``path`` is held out.
        tokenizer: Tokenizer path or hub id for ``AutoTokenizer.from_pretrained``. When None, ``setup()`` uses
            ``trainer.lightning_module.tokenizer`` unless :meth:`connect` was called.
        format: Row format; ``auto`` detects per file from the first row (``instruction`` → alpaca,
            ``messages``/``conversations`` → chat).
        prompt_style: ``chat_template`` uses ``tokenizer.apply_chat_template`` (falls back to ``alpaca``, with a
            warning, when the tokenizer has none); ``alpaca`` uses the Stanford Alpaca prompt.
        system_prompt: System message added to rows that have none.
        train_on_responses_only: Label only assistant turns and their end-of-turn token; False trains on all.
        max_length: Sequences are truncated (right) to this many tokens.
        on_long_prompt: What to do with a row whose prompt alone is ``>= max_length`` tokens: ``error`` or
            ``skip`` (dropped with one warning).
        val_split: Fraction of ``path`` held out (``0 < val_split < 1``), or a row count when ``>= 1``.
        seed: Seed for the validation split and the training order (``seed + epoch``).
        batch_size: Batch size for training and validation (with ``packing``: packed sequences per training batch).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Round each batch's padded length up to a multiple of this (e.g. 8 for tensor cores).
        group_by_length: Batch training examples of similar length (shuffled mega-batches sorted by length).
        packing: Pack whole training rows into sequences of up to ``max_length`` tokens (best-fit decreasing, in a
            seeded order): no padding between rows, positions restart at every row and no row attends to another.
            Validation batches stay unpacked.

    Raises:
        DataError: If an option value is invalid.
    """

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        tokenizer: str | None = None,
        format: Literal["auto", "alpaca", "chat"] = "auto",
        prompt_style: Literal["chat_template", "alpaca"] = "chat_template",
        system_prompt: str | None = None,
        train_on_responses_only: bool = True,
        max_length: int = 512,
        on_long_prompt: Literal["error", "skip"] = "error",
        val_split: float = 0.05,
        seed: int = 42,
        batch_size: int = 4,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = True,
        packing: bool = False,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("format", format, ("auto", "alpaca", "chat")),
            ("prompt_style", prompt_style, ("chat_template", "alpaca")),
            ("on_long_prompt", on_long_prompt, ("error", "skip")),
        ):
            if value not in allowed:
                raise DataError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"{name} must be >= 1, got {value}")
        if val_path is None and not (0 < val_split < 1 or (val_split >= 1 and float(val_split).is_integer())):
            raise DataError(
                f"val_split must be a fraction in (0, 1) or a whole row count >= 1, got {val_split}; "
                "to skip validation set limit_val_batches=0 on the Trainer"
            )
        self.save_hyperparameters()
        self.path = path
        self.val_path = val_path
        self.tokenizer_name = tokenizer
        self.format = format
        self.prompt_style = prompt_style
        self.system_prompt = system_prompt
        self.train_on_responses_only = train_on_responses_only
        self.max_length = max_length
        self.on_long_prompt = on_long_prompt
        self.val_split = val_split
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.packing = packing
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] | None = None
        self._tokenizer: Any = None
        self._rows: tuple[list[Any], list[Any]] | None = None
        self._stats: dict[str, int] = {}
        self._packed_sampler: PackedSampler | None = None  # planned in setup (for its pack count), used by the loader

    @property
    def tokenizer(self) -> Any:
        """The tokenizer in use (None until :meth:`connect` or :meth:`setup` provides one)."""
        return self._tokenizer

    def connect(self, tokenizer: Any) -> InstructionDataModule:
        """Use this tokenizer object (drops previously tokenized datasets).

        Args:
            tokenizer: A Hugging Face tokenizer.

        Returns:
            self, for chaining.
        """
        self._tokenizer = tokenizer
        self.train_dataset = self.val_dataset = self._packed_sampler = None
        return self

    def prepare_data(self) -> None:
        """Read and validate every row (and download hub datasets) before any training starts.

        Raises:
            DataError: On any bad input.
        """
        self._load()

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the training and validation rows once.

        Args:
            stage: Lightning stage (unused; both splits are built).

        Raises:
            DataError: On bad input, a prompt longer than ``max_length`` with ``on_long_prompt=error``, an empty
                split, or when no tokenizer can be found.
        """
        if self.train_dataset is not None:
            return
        tokenizer = self._resolve_tokenizer()
        train_rows, val_rows = self._load()
        style = self.prompt_style
        if style == "chat_template" and not getattr(tokenizer, "chat_template", None):
            rank_zero_warn("the tokenizer has no chat template; falling back to prompt_style='alpaca'")
            style = "alpaca"
        encoder = PromptEncoder(tokenizer, style, self.train_on_responses_only)
        self._stats = {"skipped_long_prompt": 0, "truncated": 0, "prefix_mismatch": 0}
        skipped: list[str] = []
        self.train_dataset = self._tokenize(encoder, train_rows, "train", skipped)
        self.val_dataset = self._tokenize(encoder, val_rows, "val", skipped)
        if skipped:
            rank_zero_warn(
                f"skipped {len(skipped)} rows whose prompt is >= max_length={self.max_length} tokens "
                f"(first: {skipped[0]}); raise max_length to keep them"
            )
        if self._stats["prefix_mismatch"]:
            rank_zero_warn(
                f"{self._stats['prefix_mismatch']} rows: a rendered prompt prefix is not a token prefix of the full "
                "conversation; labels start at the longest common prefix"
            )
        for split, dataset, name in (("train", self.train_dataset, self.path), ("val", self.val_dataset, None)):
            if not dataset:
                raise DataError(
                    f"{name or self.val_path or self.path}: no {split} rows left after skipping "
                    f"{len(skipped)} long prompts; raise max_length"
                )
        if self.packing:
            lengths = [len(e["input_ids"]) for e in self.train_dataset]
            self._packed_sampler = PackedSampler(lengths, self.max_length, self.seed)
            self._stats["train_packs"] = len(self._packed_sampler)  # plans epoch 0, which the loader then reuses
        rank_zero_info(f"InstructionDataModule: {self.stats()}")

    def stats(self) -> dict[str, int]:
        """Counts from the last :meth:`setup`.

        Returns:
            ``train_rows``, ``val_rows``, ``train_tokens``, ``val_tokens``, ``train_trained_tokens``,
            ``val_trained_tokens``, ``skipped_long_prompt``, ``truncated``, ``prefix_mismatch`` and, with
            ``packing``, ``train_packs`` (packed sequences per epoch).
        """
        return dict(self._stats)

    def train_dataloader(self) -> ResumableDataLoader:
        """Packed, length-grouped or shuffled training batches; calls :meth:`setup` if needed."""
        self.setup("fit")
        assert self.train_dataset is not None
        lengths = [len(e["input_ids"]) for e in self.train_dataset]
        if self.packing:
            sampler = self._packed_sampler or PackedSampler(lengths, self.max_length, self.seed)
            loader = self._loader(PackDataset(self.train_dataset), sampler=sampler, packed=True)
        elif self.group_by_length:
            loader = self._loader(self.train_dataset, sampler=LengthGroupedSampler(lengths, self.batch_size, self.seed))
        else:
            loader = self._loader(self.train_dataset, shuffle=True, generator=torch.Generator().manual_seed(self.seed))
        trainer = self.trainer
        if trainer is not None:  # resumable mid-epoch: Lightning saves and restores the loader's position
            loader.progress = lambda: trainer_progress(trainer)
        return loader

    def describe_rows(self, indices: Sequence[int], split: str = "train") -> list[str]:
        """Name data rows by position in the tokenized ``split`` (e.g. ``data.jsonl line 7``), for error messages.

        Args:
            indices: positions in the split's dataset (a batch's ``row_index``).
            split: ``"train"`` or ``"val"``.

        Returns:
            One ``file line N`` / ``file row N`` string per index.
        """
        dataset = self.train_dataset if split == "train" else self.val_dataset
        return [str(dataset[int(i)].get("where", i)) if dataset is not None else str(i) for i in indices]

    def val_dataloader(self) -> ResumableDataLoader:
        """Validation batches in file order; calls :meth:`setup` if needed."""
        self.setup("validate")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, shuffle=False)

    def _loader(self, dataset: Any, packed: bool = False, **kwargs: Any) -> ResumableDataLoader:
        tokenizer = self._tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        collate = (PackedCollator if packed else InstructionCollator)(pad_id, self.pad_to_multiple_of)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def _resolve_tokenizer(self) -> Any:
        if self._tokenizer is None and self.tokenizer_name:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
            except (OSError, ValueError) as err:
                msg = first_line(err)
                raise DataError(
                    f"tokenizer {self.tokenizer_name!r}: cannot load ({msg}); pass a tokenizer directory or hub id"
                ) from None
        if self._tokenizer is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            self._tokenizer = getattr(module, "tokenizer", None)
        if self._tokenizer is None:
            raise DataError(
                "no tokenizer: pass tokenizer=<path or hub id>, call dm.connect(tokenizer), or fit with a "
                "LightningModule that has a .tokenizer attribute"
            )
        return self._tokenizer

    def _load(self) -> tuple[list[Any], list[Any]]:
        """Read, validate and split rows into ``(messages, where)`` pairs; cached."""
        if self._rows is None:
            train = self._read_normalized(self.path)
            if self.val_path is not None:
                self._rows = (train, self._read_normalized(self.val_path))
            else:
                self._rows = _split(train, self.val_split, self.seed, self.path)
        return self._rows

    def _read_normalized(self, path: str) -> list[tuple[list[dict[str, str]], str]]:
        rows, source = read_rows(path)
        fmt = detect_format(rows[0], source.where(0)) if self.format == "auto" else self.format
        return [
            (normalize_row(row, fmt, source.where(i), self.system_prompt), source.where(i))
            for i, row in enumerate(rows)
        ]

    def _tokenize(
        self, encoder: PromptEncoder, rows: list[tuple[list[dict[str, str]], str]], split: str, skipped: list[str]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        tokens = trained = 0
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            for (_, where), enc in zip(chunk, encoder.encode_many([m for m, _ in chunk], [w for _, w in chunk])):
                if enc.prompt_tokens >= self.max_length:
                    if self.on_long_prompt == "error":
                        raise DataError(
                            f"{where}: prompt is {enc.prompt_tokens} tokens but max_length is {self.max_length}; "
                            "raise max_length or set on_long_prompt=skip"
                        )
                    skipped.append(where)
                    continue
                self._stats["truncated"] += len(enc.input_ids) > self.max_length
                self._stats["prefix_mismatch"] += enc.prefix_mismatch
                ids, labels = enc.input_ids[: self.max_length], enc.labels[: self.max_length]
                tokens += len(ids)
                trained += sum(label != IGNORE_INDEX for label in labels)
                out.append({"input_ids": ids, "labels": labels, "index": len(out), "where": where})
        self._stats["skipped_long_prompt"] = len(skipped)
        self._stats.update({f"{split}_rows": len(out), f"{split}_tokens": tokens, f"{split}_trained_tokens": trained})
        return out


def _split(rows: list[Any], val_split: float, seed: int, name: str) -> tuple[list[Any], list[Any]]:
    """Hold out ``val_split`` (fraction or count) of ``rows`` with a seeded shuffle; both parts keep file order."""
    n = len(rows)
    n_val = int(val_split) if val_split >= 1 else max(1, round(n * val_split))
    if n_val >= n:
        raise DataError(
            f"{name}: {n} rows cannot give {n_val} validation rows and keep at least 1 for training; "
            "add rows, lower val_split, or pass val_path"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
