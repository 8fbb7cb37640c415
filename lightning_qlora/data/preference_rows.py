r"""Preference rows: the public layouts normalized to a shared prompt and two responses, and synthetic pairs.

Layouts (see :mod:`lightning_qlora.data.preference`): ``{"prompt", "chosen", "rejected"}`` with strings or messages,
whole chat conversations (HH-RLHF, UltraFeedback), Anthropic HH-RLHF ``"\n\nHuman: ...\n\nAssistant: ..."``
strings, and instruction rows paired with another row's answer (``rejected_from="other_answer"``). Messages are
validated by :func:`lightning_qlora.data.prompts.normalize_row`, so errors read as the instruction data's do.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from lightning_qlora.data.prompts import DataError, normalize_row

__all__ = ["Messages", "Pair", "normalize_pair", "pair_with_other_answers"]

Messages = list[dict[str, str]]
Pair = tuple[Messages, str, str, str]
"""``(prompt messages, chosen response, rejected response, where)``."""

_ASSISTANT = ("assistant", "gpt", "bot", "model")  # the assistant role and its aliases (prompts.normalize_row's)
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _conversation(value: Any, prompt: Messages | None, where: str, key: str) -> list[Any]:
    """``value`` as a list of turns: a whole conversation, or the prompt plus its continuation."""
    if isinstance(value, list):
        whole = any(isinstance(m, dict) and m.get("role", m.get("from")) not in _ASSISTANT for m in value)
        return value if whole or prompt is None else [*prompt, *value]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}")
    if prompt is not None:
        return [*prompt, {"role": "assistant", "content": value}]
    parts = _HH_TURN.split(value)
    if len(parts) < 3:
        raise DataError(
            f"{where}: '{key}' is a plain string but the row has no 'prompt'; add a 'prompt', give whole "
            "conversations as message lists, or use HH-RLHF's '\\n\\nHuman: ... \\n\\nAssistant: ...' form"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def normalize_pair(row: Any, where: str, system_prompt: str | None = None) -> tuple[Messages, str, str]:
    """Validate one preference row and split it into the shared prompt and the two responses.

    Args:
        row: a parsed row (see the module docstring for the layouts).
        where: location used in error messages, e.g. ``"pairs.jsonl line 3"``.
        system_prompt: prepended as a system message when the prompt has none.

    Returns:
        ``(prompt messages, chosen text, rejected text)``; the prompt ends before the final assistant turn.

    Raises:
        DataError: for a missing key, a wrong type, a conversation without an assistant turn or prompt, or
            chosen and rejected conversations that differ before their last assistant turn.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; fix or remove the row")
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        hint = ""
        if "instruction" in row or "messages" in row or "conversations" in row:
            hint = "; this looks like an instruction row: use rejected_from=other_answer or InstructionDataModule"
        raise DataError(
            f"{where}: missing required key '{missing[0]}' (preference rows need 'chosen' and 'rejected', plus "
            f"'prompt' unless they are whole conversations){hint}"
        )
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is not None and not isinstance(prompt, list):
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    splits = []
    for key in ("chosen", "rejected"):
        turns = _conversation(row[key], prompt, where, key)
        messages = normalize_row({"messages": turns}, "chat", f"{where} {key}", system_prompt)
        if all(m["role"] == "system" for m in messages[:-1]):
            raise DataError(f"{where}: '{key}' has no prompt before its assistant turn; add a 'prompt' or a user turn")
        splits.append((messages[:-1], messages[-1]["content"]))
    (chosen_prompt, chosen), (rejected_prompt, rejected) = splits
    if chosen_prompt != rejected_prompt:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' differ before their last assistant turn; a pair must share its prompt"
        )
    return chosen_prompt, chosen, rejected


def pair_with_other_answers(rows: Sequence[tuple[Messages, str]], seed: int, name: str) -> list[Pair]:
    """Pairs from instruction rows: chosen = the row's answer, rejected = another row's (a seeded derangement).

    Row ``order[k]`` (a seeded shuffle) takes the answer of ``order[k+1]``, or the next row after it whose answer
    differs from its own.

    Args:
        rows: normalized ``(messages, where)`` rows, each ending with its assistant answer.
        seed: the shuffle's seed.
        name: the data's name, for errors.

    Raises:
        DataError: with fewer than two rows, or when every answer is the same.
    """
    if len(rows) < 2:
        raise DataError(f"{name}: rejected_from=other_answer needs at least 2 rows per split, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    answers = [messages[-1]["content"] for messages, _ in rows]
    pairs: dict[int, Pair] = {}
    for k, i in enumerate(order):
        others = (order[(k + j) % len(order)] for j in range(1, len(order)))
        other = next((o for o in others if answers[o] != answers[i]), None)
        if other is None:
            raise DataError(f"{name}: every row has the same answer, so rejected_from=other_answer finds no other")
        pairs[i] = (rows[i][0][:-1], answers[i], answers[other], rows[i][1])
    return [pairs[i] for i in range(len(rows))]  # file order
