r"""Preference data: prompt + chosen + rejected rows, chat template applied, log-probabilities over responses only.

Example:
    >>> dm = PreferenceDataModule("pairs.jsonl", max_length=512)   # {"prompt", "chosen", "rejected"} per line
    >>> dm.connect(tokenizer)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))  # 2B rows: the B chosen sequences, then the B rejected ones

Accepted rows (detected per row; one-line errors name the file and line):

* ``{"prompt": str, "chosen": str, "rejected": str}``: the prompt is one user turn.
* ``{"prompt": [messages], "chosen": [messages] | str, "rejected": ...}``: TRL's conversational layout; ``chosen`` and
  ``rejected`` continue the prompt (usually one assistant message each).
* ``{"chosen": [messages], "rejected": [messages]}``: whole conversations (HH-RLHF in chat form, UltraFeedback
  binarized, which also carries a redundant ``prompt``); the prompt is everything before the last assistant turn,
  which must be the same in both.
* ``{"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}``: the original Anthropic HH-RLHF strings.
* with ``rejected_from="other_answer"``: instruction rows (Alpaca or chat, as :class:`InstructionDataModule` reads
  them); chosen is the row's own answer, rejected the answer of another row of the same split (a seeded derangement).

Over-long pairs (``on_long_row``): ``truncate`` (default) first cuts the prompt from the left, keeping at least
``max_prompt_length`` tokens, until the longer response fits, then cuts both responses from the right to
``max_length`` (TRL's ``keep_end`` for prompts); ``skip`` drops the pair (counted, one warning); ``error`` stops with
the row's location.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_qlora.data.batching import InstructionCollator, LengthGroupedSampler
from lightning_qlora.data.datamodule import InstructionDataModule
from lightning_qlora.data.loader import ResumableDataLoader, trainer_progress
from lightning_qlora.data.preference_rows import Pair, normalize_pair, pair_with_other_answers
from lightning_qlora.data.prompts import IGNORE_INDEX, DataError, PromptEncoder, read_rows
from lightning_qlora.data.templates import common_prefix, trim_span

__all__ = ["PreferenceCollator", "PreferenceDataModule", "normalize_pair"]

_CHUNK = 256  # pairs tokenized per batched tokenizer call


class PreferenceCollator:
    """Pad pairs into one batch of ``2B`` rows: the ``B`` chosen sequences, then the ``B`` rejected ones.

    ``labels`` are ``-100`` outside the responses; ``row_index`` (``B``) names the pairs for error messages.

    Args:
        pad_id: padding token id.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self._pad = InstructionCollator(pad_id, pad_to_multiple_of)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate pairs into ``input_ids``, ``attention_mask`` and ``labels`` of shape ``(2B, T)``."""
        rows = [{"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"]}
                for side in ("chosen", "rejected") for e in examples]  # fmt: skip
        batch = self._pad(rows)
        if all("index" in e for e in examples):
            batch["row_index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        return batch


class PreferenceDataModule(InstructionDataModule):
    """Preference pairs for DPO, IPO and ORPO: one prompt, a chosen and a rejected response, responses labelled.

    Reading, validation splits, tokenizer resolution and resumable loaders are :class:`InstructionDataModule`'s;
    batches hold ``2B`` sequences (see :class:`PreferenceCollator`). Packing is not offered: each pair is scored
    as two whole sequences.

    Args:
        path: training rows: a ``.json``/``.jsonl`` file, a folder of them, ``pkg://package/rel/path`` or a
            ``datasets`` hub name (``name`` or ``name:split``); layouts in the module docstring.
        val_path: validation rows in the same forms; when None, ``val_split`` of ``path`` is held out.
        tokenizer: tokenizer path or hub id; default the module's ``tokenizer`` (or :meth:`connect`).
        rejected_from: ``row`` (rows carry ``chosen`` and ``rejected``) or ``other_answer`` (instruction rows:
            rejected is another row's answer; pairs are formed within each split).
        format: instruction-row format for ``other_answer`` (``auto``, ``alpaca``, ``chat``); preference rows are
            recognized by their keys, so it stays ``auto`` with ``row``.
        prompt_style: ``chat_template`` (falls back to ``alpaca``, with a warning, when the tokenizer has none) or
            ``alpaca``.
        system_prompt: system message added to prompts that have none.
        max_length: tokens per sequence (prompt + one response).
        max_prompt_length: the fewest prompt tokens ``truncate`` keeps (default ``max_length // 2``).
        on_long_row: ``truncate``, ``skip`` or ``error`` for a pair whose longer sequence exceeds ``max_length``.
        val_split: fraction of ``path`` held out (``0 < val_split < 1``), or a row count when ``>= 1``.
        seed: seed for the split, the ``other_answer`` pairing and the training order (``seed + epoch``).
        batch_size: pairs per batch (``2 × batch_size`` sequences).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: round each batch's padded length up to a multiple of this.
        group_by_length: batch pairs of similar length (shuffled mega-batches sorted by the longer sequence).

    Raises:
        DataError: if an option value is invalid.
    """

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        tokenizer: str | None = None,
        rejected_from: Literal["row", "other_answer"] = "row",
        format: Literal["auto", "alpaca", "chat"] = "auto",
        prompt_style: Literal["chat_template", "alpaca"] = "chat_template",
        system_prompt: str | None = None,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        on_long_row: Literal["truncate", "skip", "error"] = "truncate",
        val_split: float = 0.05,
        seed: int = 42,
        batch_size: int = 4,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = True,
    ) -> None:
        for name, value, allowed in (
            ("rejected_from", rejected_from, ("row", "other_answer")),
            ("on_long_row", on_long_row, ("truncate", "skip", "error")),
        ):
            if value not in allowed:
                raise DataError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if rejected_from == "row" and format != "auto":
            raise DataError(
                f"format={format!r} describes instruction rows and applies with rejected_from=other_answer; "
                "preference rows are recognized by their keys (leave format=auto)"
            )
        prompt_floor = max_length // 2 if max_prompt_length is None else max_prompt_length
        if not 1 <= prompt_floor < max_length:
            raise DataError(f"max_prompt_length must be in [1, max_length={max_length}), got {max_prompt_length}")
        super().__init__(
            path, val_path=val_path, tokenizer=tokenizer, format=format, prompt_style=prompt_style,
            system_prompt=system_prompt, max_length=max_length, val_split=val_split, seed=seed,
            batch_size=batch_size, num_workers=num_workers, pad_to_multiple_of=pad_to_multiple_of,
            group_by_length=group_by_length,
        )  # fmt: skip
        self.rejected_from = rejected_from
        self.max_prompt_length = prompt_floor
        self.on_long_row = on_long_row

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the training and validation pairs once.

        Args:
            stage: Lightning stage (unused; both splits are built).

        Raises:
            DataError: on bad input, an over-long pair with ``on_long_row=error``, an empty split or no tokenizer.
        """
        if self.train_dataset is not None:
            return
        tokenizer = self._resolve_tokenizer()
        train_rows, val_rows = self._load()
        if self.rejected_from == "other_answer":
            train_rows = pair_with_other_answers(train_rows, self.seed, self.path)
            val_rows = pair_with_other_answers(val_rows, self.seed, self.val_path or self.path)
        style = self.prompt_style
        if style == "chat_template" and not getattr(tokenizer, "chat_template", None):
            rank_zero_warn("the tokenizer has no chat template; falling back to prompt_style='alpaca'")
            style = "alpaca"
        encoder = PromptEncoder(tokenizer, style)
        self._stats = {"skipped_long": 0, "truncated_prompt": 0, "truncated_response": 0, "prefix_mismatch": 0}
        skipped: list[str] = []
        self.train_dataset = self._encode(encoder, train_rows, "train", skipped)
        self.val_dataset = self._encode(encoder, val_rows, "val", skipped)
        if skipped:
            rank_zero_warn(
                f"skipped {len(skipped)} pairs longer than max_length={self.max_length} tokens (first: {skipped[0]}); "
                "raise max_length or set on_long_row=truncate to keep them"
            )
        if self._stats["truncated_prompt"] or self._stats["truncated_response"]:
            rank_zero_info(
                f"PreferenceDataModule: cut {self._stats['truncated_prompt']} prompts (from the left) and "
                f"{self._stats['truncated_response']} pairs' responses (from the right) to max_length={self.max_length}"
            )
        if self._stats["prefix_mismatch"]:
            rank_zero_warn(
                f"{self._stats['prefix_mismatch']} sequences: the rendered prompt is not a token prefix of prompt + "
                "response; scoring starts at the longest common prefix"
            )
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset)):
            if not dataset:
                name = self.val_path if split == "val" and self.val_path else self.path
                raise DataError(
                    f"{name}: no {split} pairs left after skipping {len(skipped)} long ones; raise max_length or set "
                    "on_long_row=truncate"
                )
        rank_zero_info(f"PreferenceDataModule: {self.stats()}")

    def stats(self) -> dict[str, int]:
        """Counts from the last :meth:`setup`.

        Returns:
            ``train_pairs``, ``val_pairs``, ``train_tokens``, ``val_tokens`` (both sequences of every pair),
            ``skipped_long``, ``truncated_prompt``, ``truncated_response`` (pairs) and ``prefix_mismatch`` (sequences).
        """
        return dict(self._stats)

    def train_dataloader(self) -> ResumableDataLoader:
        """Length-grouped or shuffled training pairs; calls :meth:`setup` if needed."""
        self.setup("fit")
        assert self.train_dataset is not None
        if self.group_by_length:
            lengths = [max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in self.train_dataset]
            loader = self._loader(self.train_dataset, sampler=LengthGroupedSampler(lengths, self.batch_size, self.seed))
        else:
            loader = self._loader(self.train_dataset, shuffle=True, generator=torch.Generator().manual_seed(self.seed))
        trainer = self.trainer
        if trainer is not None:  # resumable mid-epoch: Lightning saves and restores the loader's position
            loader.progress = lambda: trainer_progress(trainer)
        return loader

    def _loader(self, dataset: Any, packed: bool = False, **kwargs: Any) -> ResumableDataLoader:
        tokenizer = self._tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=PreferenceCollator(pad_id, self.pad_to_multiple_of),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def _read_normalized(self, path: str) -> list[Any]:
        if self.rejected_from == "other_answer":
            return super()._read_normalized(path)
        rows, source = read_rows(path)
        return [
            (*normalize_pair(row, source.where(i), self.system_prompt), source.where(i)) for i, row in enumerate(rows)
        ]

    def _encode(
        self, encoder: PromptEncoder, pairs: list[Pair], split: str, skipped: list[str]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        tokens = 0
        special = encoder.prompt_style == "alpaca"
        for start in range(0, len(pairs), _CHUNK):
            chunk = pairs[start : start + _CHUNK]
            texts = []
            for prompt, chosen, rejected, where in chunk:
                texts.append(encoder.render(prompt, True, where))
                for response in (chosen, rejected):
                    texts.append(encoder.render([*prompt, {"role": "assistant", "content": response}], False, where))
            ids = encoder.tokenizer(texts, add_special_tokens=special)["input_ids"]
            for k, (_, _, _, where) in enumerate(chunk):
                prompt_ids, chosen_ids, rejected_ids = ids[3 * k : 3 * k + 3]
                example = self._pair(encoder, prompt_ids, chosen_ids, rejected_ids, where)
                if example is None:
                    skipped.append(where)
                    continue
                tokens += len(example["chosen_input_ids"]) + len(example["rejected_input_ids"])
                out.append({**example, "index": len(out), "where": where})
        self._stats["skipped_long"] = len(skipped)
        self._stats.update({f"{split}_pairs": len(out), f"{split}_tokens": tokens})
        return out

    def _pair(
        self, encoder: PromptEncoder, prompt: list[int], chosen: list[int], rejected: list[int], where: str
    ) -> dict[str, Any] | None:
        """Labels over each response, then the over-long policy; ``None`` when the pair is skipped."""
        sides = []
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            start = common_prefix(prompt, ids)  # the prompt's tokens; a BPE merge may end it early
            self._stats["prefix_mismatch"] += start < len(prompt)
            # whitespace the template puts after the end-of-turn token is not scored
            start, end = trim_span(ids, start, len(ids), encoder.is_blank)
            if end <= start:
                raise DataError(f"{where}: the {name} response is empty after tokenization; fix or remove the row")
            sides.append((list(ids), start, end))
        longest = max(len(ids) for ids, _, _ in sides)
        if longest > self.max_length:
            if self.on_long_row == "error":
                raise DataError(
                    f"{where}: a sequence of this pair is {longest} tokens but max_length is {self.max_length}; raise "
                    "max_length or set on_long_row=truncate or skip"
                )
            if self.on_long_row == "skip":
                return None
            response = max(len(ids) - start for ids, start, _ in sides)
            cut_prompt = cut_response = False
            for k, (ids, start, end) in enumerate(sides):
                keep = min(start, max(self.max_length - response, self.max_prompt_length))
                cut_prompt |= keep < start
                ids, start, end = ids[start - keep :], keep, end - (start - keep)
                cut_response |= len(ids) > self.max_length
                sides[k] = (ids[: self.max_length], start, min(end, self.max_length))
            self._stats["truncated_prompt"] += cut_prompt
            self._stats["truncated_response"] += cut_response
        example: dict[str, Any] = {}
        for name, (ids, start, end) in zip(("chosen", "rejected"), sides):
            if end <= max(start, 1):
                raise DataError(f"{where}: no {name} response token is left after truncation; raise max_length")
            example[f"{name}_input_ids"] = ids
            example[f"{name}_labels"] = [IGNORE_INDEX] * start + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)
        return example
