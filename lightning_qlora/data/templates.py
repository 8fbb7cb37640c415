r"""Splitting a chat template's text into prompt and response: the checks and token spans behind response-only labels.

Two ways to find the assistant tokens of a rendered conversation:

1. **Prefixes** (any template): the prompt of assistant turn *k* is the conversation before it rendered with
   ``add_generation_prompt=True``; its tokens must be the start of the full conversation's tokens, and the turn runs
   to where the conversation through turn *k* stops agreeing with the full one (so a template that closes the last
   turn with EOS trains that EOS). A template whose prompt text is not the start of the conversation it renders
   (one that re-renders earlier turns, or opens the answer differently in the prompt than in the conversation,
   like DeepSeek-R1's ``<think>``) cannot be split this way: :func:`split_problem` names where they differ.
2. **``{% generation %}`` markers** (templates written for training, e.g. TRL's ``*_training.jinja``):
   transformers' ``return_assistant_tokens_mask`` marks the tokens the template wraps in ``{% generation %}``.

Whitespace-only tokens at the end of a turn are left out (the ``\n`` a template puts after an end-of-turn token is
not something the model needs to learn to say); a marked span also loses those at its start, the line break that
ends the assistant header in templates whose generation prompt already holds it (TRL's ChatML ones).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["assistant_spans", "common_prefix", "generation_template", "split_problem", "trim_span"]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def generation_template(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template marks assistant output with ``{% generation %}`` blocks."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return next(i for i in range(n) if a[i] != b[i])


def turn_end(through: Sequence[int], conversation: Sequence[int], start: int) -> int:
    """Where an assistant turn that starts at ``start`` ends in the whole ``conversation``'s ids.

    ``through`` is the conversation rendered up to and with that turn. Usually it is a prefix of ``conversation``, up to
    a merge of its last token; but a template may render the turn differently when it is the last message (Qwen3
    adds an empty ``<think></think>`` block): then the turn ends where the longest tail of ``through`` that resumes
    ``conversation`` at their first difference ends.
    """
    at = common_prefix(through, conversation)
    if at == len(through) or at < start:
        return at
    tail, rest = list(through[at:]), list(conversation[at:])
    return at + next((k for k in range(len(tail), 0, -1) if rest[:k] == tail[-k:]), 0)


def split_problem(prompt: str, conversation: str, turn: int) -> str | None:
    """Why ``prompt`` cannot mark where assistant turn ``turn`` starts in ``conversation`` (None when it can).

    Args:
        prompt: the conversation before the turn, rendered with ``add_generation_prompt=True``.
        conversation: the whole conversation, rendered.
        turn: the assistant turn's number (1-based), for the message.

    Returns:
        A clause for an error line, or None.
    """
    if conversation.startswith(prompt):
        return None
    at = common_prefix(prompt, conversation)  # type: ignore[arg-type]  (works on strings too)
    return (
        f"the prompt it renders for assistant turn {turn} (add_generation_prompt=True) is not the start of the "
        f"conversation it renders: they differ at {prompt[at : at + 24]!r} vs {conversation[at : at + 24]!r}"
    )


def trim_span(
    ids: Sequence[int], start: int, end: int, is_blank: Callable[[int], bool], leading: bool = False
) -> tuple[int, int]:
    """``[start, end)`` without whitespace-only tokens at its end (and at its start with ``leading``)."""
    while end > start and is_blank(ids[end - 1]):
        end -= 1
    while leading and start < end and is_blank(ids[start]):
        start += 1
    return start, end


def assistant_spans(mask: Sequence[int]) -> list[tuple[int, int]]:
    """The runs of 1s in an assistant-tokens mask, as ``[start, end)`` pairs."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans
