"""Prompts for generation: the rows training reads, without their answers, rendered up to the assistant's turn.

A prompt row is an Alpaca row (``instruction``, optional ``input``; an ``output`` becomes the reference answer) or a
chat row (``messages``/``conversations``; a final assistant turn becomes the reference answer). Rows are validated by
the same :func:`~lightning_qlora.data.prompts.normalize_row` as training rows and rendered by the same
:class:`~lightning_qlora.data.prompts.PromptEncoder` with ``add_generation_prompt=True``, so a prompt is exactly the
token prefix training put before the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_qlora.data.prompts import (
    DataError,
    PromptEncoder,
    PromptStyle,
    RowFormat,
    detect_format,
    normalize_row,
    read_rows,
)

_ROLES = ("system", "user", "assistant")


@dataclass
class PromptRow:
    """One prompt to complete."""

    messages: list[dict[str, str]]
    """The conversation so far, ending with the turn the model answers (``role``/``content``; Alpaca user turns also
    keep ``instruction``/``input`` for the Alpaca prompt)."""
    where: str
    """Where the row came from (``prompts.jsonl line 3``), for errors and the output."""
    reference: str | None = None
    """The row's own answer (an Alpaca ``output``, a final assistant turn), if it has one."""
    id: Any = None
    """The row's ``id`` field, if any, copied to its prediction."""


def prompt_row(row: Any, fmt: RowFormat, where: str, system_prompt: str | None = None) -> PromptRow:
    """Validate one row and split it into the prompt messages and its reference answer.

    Args:
        row: a parsed row.
        fmt: ``"alpaca"`` or ``"chat"`` (:func:`~lightning_qlora.data.prompts.detect_format`).
        where: location used in error messages.
        system_prompt: prepended as a system message when the row has none (as in training).

    Returns:
        The :class:`PromptRow`.

    Raises:
        DataError: if the row is malformed or has nothing to answer.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; fix or remove the row")
    # normalize_row validates training rows, which end with an answer: an answer-less row gets an empty one to pass
    if fmt == "alpaca":
        messages = normalize_row({"output": "", **row}, fmt, where, system_prompt)[:-1]
        reference = row.get("output")
    else:
        key = "messages" if "messages" in row else "conversations"
        turns = row.get(key)
        if isinstance(turns, list) and turns:
            row = {**row, key: [*turns, {"role": "assistant", "content": ""}]}
        messages = normalize_row(row, fmt, where, system_prompt)[:-1]
        reference = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else None
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: no user turn to answer; add a message with role 'user' or remove the row")
    if messages[-1]["role"] != "user":  # [user, assistant, assistant]: the answer would follow an assistant turn
        roles = ", ".join(m["role"] for m in messages) + (", assistant (reference)" if reference is not None else "")
        raise DataError(
            f"{where}: the turns are {roles}; the model answers a user turn, so the last user message must come right "
            "before the (optional) final assistant answer"
        )
    return PromptRow(messages=messages, where=where, reference=reference, id=row.get("id"))


def read_prompt_rows(path: str, format: str = "auto", system_prompt: str | None = None) -> list[PromptRow]:
    """Read prompt rows from a ``.json``/``.jsonl`` file, a folder of them or a ``pkg://`` resource.

    Args:
        path: where the rows are (as for training data).
        format: ``auto`` (from the first row), ``alpaca`` or ``chat``.
        system_prompt: system message for rows without one.

    Returns:
        One :class:`PromptRow` per row, in file order.

    Raises:
        DataError: for a missing or unreadable file or a malformed row (naming its line).
    """
    if format not in ("auto", "alpaca", "chat"):
        raise DataError(f"unknown format {format!r}; use one of auto, alpaca, chat")
    rows, source = read_rows(path)
    fmt: RowFormat = detect_format(rows[0], source.where(0)) if format == "auto" else format  # type: ignore[assignment]
    return [prompt_row(row, fmt, source.where(i), system_prompt) for i, row in enumerate(rows)]


def chat_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate OpenAI-style chat messages: ``role`` system/user/assistant, string ``content``, a user turn last.

    Raises:
        DataError: naming the first bad message.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    clean = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; use one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: messages[{i}].content must be a string (text only), got {type(content).__name__}"
            )
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] == "assistant":
        raise DataError(f"{where}: the last message is the assistant's; end with a user message to get an answer")
    if not any(m["role"] == "user" for m in clean):
        raise DataError(f"{where}: no user message; add one with role 'user'")
    return clean


def resolve_prompt_style(tokenizer: Any, prompt_style: PromptStyle) -> PromptStyle:
    """The style training used: ``chat_template`` falls back to ``alpaca`` for a tokenizer without a chat template."""
    if prompt_style == "chat_template" and not getattr(tokenizer, "chat_template", None):
        return "alpaca"
    return prompt_style


def render_prompts(
    tokenizer: Any, conversations: Sequence[list[dict[str, str]]], prompt_style: PromptStyle, wheres: Sequence[str]
) -> list[str]:
    """Render each conversation up to the assistant's turn, as training rendered the prompt before an answer.

    Args:
        tokenizer: the model's tokenizer.
        conversations: messages per prompt (:attr:`PromptRow.messages`).
        prompt_style: ``chat_template`` or ``alpaca`` (see :func:`resolve_prompt_style`).
        wheres: location of each prompt, for errors.

    Returns:
        One prompt text per conversation; tokenize them with ``add_special_tokens=`` :func:`adds_special_tokens`.

    Raises:
        DataError: if the chat template fails on a conversation.
    """
    encoder = PromptEncoder(tokenizer, resolve_prompt_style(tokenizer, prompt_style))
    return [encoder.render(messages, True, where) for messages, where in zip(conversations, wheres)]


def adds_special_tokens(tokenizer: Any, prompt_style: PromptStyle) -> bool:
    """Whether prompts are tokenized with the tokenizer's special tokens (BOS), as training tokenized them."""
    return resolve_prompt_style(tokenizer, prompt_style) == "alpaca"


__all__ = [
    "PromptRow",
    "adds_special_tokens",
    "chat_messages",
    "prompt_row",
    "read_prompt_rows",
    "render_prompts",
    "resolve_prompt_style",
]
