"""Validating instruction rows, prompt rendering and response-only label masking.

Rows are read from ``.json``/``.jsonl`` files, ``pkg://`` package resources or ``datasets`` hub names
(:mod:`lightning_qlora.data.rows`, re-exported here), then normalized to ``{"role", "content"}`` messages (Alpaca rows
become one user and one assistant turn), rendered with the tokenizer's chat template or the standard Alpaca prompt,
and tokenized so that only assistant turns (plus the end-of-turn token that closes each) carry labels; how a
template is split into prompt and response is :mod:`lightning_qlora.data.templates`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_qlora.data.rows import DataError, RowSource, read_rows
from lightning_qlora.data.templates import (
    assistant_spans,
    common_prefix,
    generation_template,
    split_problem,
    trim_span,
    turn_end,
)
from lightning_qlora.utils.errors import first_line

__all__ = [
    "ALPACA_PREAMBLE",
    "ALPACA_PREAMBLE_INPUT",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_INPUT",
    "IGNORE_INDEX",
    "DataError",
    "Encoded",
    "PromptEncoder",
    "PromptStyle",
    "RowFormat",
    "RowSource",
    "detect_format",
    "normalize_row",
    "read_rows",
    "render_alpaca",
]

IGNORE_INDEX = -100

RowFormat = Literal["alpaca", "chat"]
PromptStyle = Literal["chat_template", "alpaca"]

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PROMPT = ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = (
    ALPACA_PREAMBLE_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "prompter": "user"}
_ROLES = ("system", "user", "assistant", "tool", "function", "ipython", "developer")
"""The roles chat templates know (OpenAI's and Llama 3.1's), after the ShareGPT/OASST aliases above."""
_CHAT_KEYS = ("messages", "conversations")


def detect_format(row: Any, where: str) -> RowFormat:
    """Guess the row format from a row's keys.

    Args:
        row: The first row of a file.
        where: Location used in error messages, e.g. ``"data.jsonl line 1"``.

    Returns:
        ``"chat"`` when the row has ``messages`` (or ShareGPT ``conversations``), ``"alpaca"`` for ``instruction``.

    Raises:
        DataError: If the row is not an object or matches neither format.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; fix or remove the row")
    if _is_chat(row):
        return "chat"
    if "instruction" in row:
        return "alpaca"
    keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
    raise DataError(
        f"{where}: unknown row format (keys: {keys}); expected 'instruction'/'output' (alpaca) or 'messages' (chat)"
    )


def _is_chat(row: dict[str, Any]) -> bool:
    return any(k in row for k in _CHAT_KEYS)


def normalize_row(row: Any, fmt: RowFormat, where: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Validate one row and convert it to chat messages ending with the last assistant turn.

    Alpaca rows become ``[user, assistant]``; the user message also keeps ``instruction``/``input`` keys so the
    Alpaca prompt style can render the classic with-input template.

    Args:
        row: A parsed row.
        fmt: ``"alpaca"`` or ``"chat"``.
        where: Location used in error messages.
        system_prompt: Prepended as a system message when the row has none.

    Returns:
        The normalized messages.

    Raises:
        DataError: If keys are missing or have the wrong type, or a chat has no assistant turn.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; fix or remove the row")
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in row:
                hint = "; this looks like a chat row: use one format per file" if _is_chat(row) else ""
                raise DataError(
                    f"{where}: missing required key '{key}' (alpaca rows need 'instruction' and 'output'){hint}"
                )
        for key in ("instruction", "input", "output"):
            value = row.get(key)
            if not (isinstance(value, str) or (key == "input" and value is None)):
                raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}; fix or remove the row")
        instruction, inp = row["instruction"], row.get("input") or ""
        user = {"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}
        user.update(instruction=instruction, input=inp)
        messages = [user, {"role": "assistant", "content": row["output"]}]
    else:
        key = next((k for k in _CHAT_KEYS if k in row), None)
        if key is None:
            hint = "; this looks like an alpaca row: use one format per file" if "instruction" in row else ""
            raise DataError(
                f"{where}: missing required key 'messages' (chat rows need a list of {{role, content}}){hint}"
            )
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            got = "an empty list" if isinstance(turns, list) else type(turns).__name__
            raise DataError(f"{where}: '{key}' must be a non-empty list of {{role, content}} objects, got {got}")
        messages = []
        for j, turn in enumerate(turns):
            role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
            content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
            if not isinstance(role, str) or not isinstance(content, str):
                raise DataError(f"{where}: {key}[{j}] must be an object with string 'role' and 'content'")
            role = _ROLE_ALIASES.get(role, role)
            if role not in _ROLES:
                raise DataError(
                    f"{where}: {key}[{j}] has role {role!r}; use one of {', '.join(_ROLES)} (or the aliases "
                    f"{', '.join(_ROLE_ALIASES)})"
                )
            messages.append({"role": role, "content": content})
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: no assistant turn; add a message with role 'assistant' or remove the row")
        messages = messages[: last + 1]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_alpaca(messages: Sequence[dict[str, str]], eos: str, add_generation_prompt: bool = False) -> str:
    """Render messages with the Alpaca prompt; assistant turns end with ``eos``.

    A leading system message replaces the standard preamble; later turns repeat the ``### Instruction`` /
    ``### Response`` blocks.

    Args:
        messages: Normalized messages.
        eos: The end-of-sequence token text appended to each response.
        add_generation_prompt: Append ``### Response:`` so the text ends where the next response starts.

    Returns:
        The prompt text.
    """
    msgs = list(messages)
    first_user = next((m for m in msgs if m["role"] == "user"), {})
    if msgs and msgs[0]["role"] == "system":
        preamble = msgs.pop(0)["content"]
    else:
        preamble = ALPACA_PREAMBLE_INPUT if first_user.get("input") else ALPACA_PREAMBLE
    text = preamble + "\n\n"
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            text += f"### Response:\n{m['content']}{eos}"
            continue
        if i and msgs[i - 1]["role"] == "assistant":
            text += "\n\n"
        if m["role"] == "user":
            text += f"### Instruction:\n{m.get('instruction', m['content'])}\n\n"
            text += f"### Input:\n{m['input']}\n\n" if m.get("input") else ""
        else:
            text += f"### Input:\n{m['content']}\n\n"
    if add_generation_prompt:
        text += "### Response:\n"
    return text


@dataclass
class Encoded:
    """One tokenized example."""

    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    """Length of the prompt before the first assistant turn."""
    prefix_mismatch: bool = False
    """True when a rendered prefix was not a token prefix of the full text (masking used the common prefix)."""


class PromptEncoder:
    """Render and tokenize normalized conversations with response-only labels.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt_style: ``"chat_template"`` (``tokenizer.apply_chat_template``) or ``"alpaca"``.
        train_on_responses_only: Label only assistant turns (and their end-of-turn token); else every token.
    """

    def __init__(
        self, tokenizer: Any, prompt_style: PromptStyle = "chat_template", train_on_responses_only: bool = True
    ):
        self.tokenizer = tokenizer
        self.prompt_style = prompt_style
        self.train_on_responses_only = train_on_responses_only
        self._blank: dict[int, bool] = {}

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
        """Render messages to text with the configured prompt style.

        Args:
            messages: Normalized messages.
            add_generation_prompt: End with the assistant header.
            where: Location used in error messages.

        Returns:
            The rendered text.

        Raises:
            DataError: If the chat template fails on this row.
        """
        if self.prompt_style == "alpaca":
            return render_alpaca(messages, self.tokenizer.eos_token or "", add_generation_prompt)
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                clean, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # jinja TemplateError, or a template's raise_exception
            msg = first_line(err)
            raise DataError(
                f"{where}: the chat template failed ({msg}); fix the row or use prompt_style=alpaca"
            ) from err

    def encode_many(self, conversations: Sequence[list[dict[str, str]]], wheres: Sequence[str]) -> list[Encoded]:
        """Tokenize conversations; texts are tokenized in one batched call.

        A chat template with ``{% generation %}`` markers labels what it marks (transformers'
        ``return_assistant_tokens_mask``); any other template is split with rendered prefixes
        (:mod:`lightning_qlora.data.templates`).

        Args:
            conversations: Normalized messages per row.
            wheres: Location of each row, for error messages.

        Returns:
            One :class:`Encoded` per conversation (untruncated).

        Raises:
            DataError: If the template fails on a row, cannot be split into prompt and response, or labels no token
                of an assistant turn.
        """
        if self.prompt_style == "chat_template" and generation_template(self.tokenizer):
            return [self._encode_marked(m, where) for m, where in zip(conversations, wheres)]
        texts: list[str] = []
        plans: list[list[tuple[int, int]]] = []
        for messages, where in zip(conversations, wheres):
            plan = []
            full = len(texts)
            texts.append(self.render(messages, False, where))
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            for i in turns:
                texts.append(self.render(messages[:i], True, where))
                if i == len(messages) - 1:
                    plan.append((len(texts) - 1, full))
                else:
                    texts.append(self.render(messages[: i + 1], False, where))
                    plan.append((len(texts) - 2, len(texts) - 1))
            plans.append([(full, full), *plan])
        ids = self.tokenizer(texts, add_special_tokens=self.prompt_style == "alpaca")["input_ids"]
        return [self._encode_one(texts, ids, plan, where) for plan, where in zip(plans, wheres)]

    def _encode_one(self, texts: list[str], ids: list[list[int]], plan: list[tuple[int, int]], where: str) -> Encoded:
        full = ids[plan[0][0]]
        labels = [IGNORE_INDEX] * len(full)
        mismatch, prompt_tokens = False, None
        for turn, (prefix_idx, through_idx) in enumerate(plan[1:], 1):
            problem = split_problem(texts[prefix_idx], texts[plan[0][0]], turn)
            if problem is not None:
                raise DataError(f"{where}: the chat template cannot be split into prompt and response: {problem}; "
                                "add {% generation %} markers to the template or use prompt_style=alpaca")  # fmt: skip
            prefix = ids[prefix_idx]
            start = common_prefix(prefix, full)
            end = len(full) if through_idx == plan[0][0] else turn_end(ids[through_idx], full, start)
            mismatch |= start < len(prefix)  # the prompt's last token merged with the response's first
            prompt_tokens = start if prompt_tokens is None else prompt_tokens
            start, end = trim_span(full, start, end, self.is_blank)  # not the "\n" after an end-of-turn token
            if end <= start:
                raise DataError(
                    f"{where}: the chat template renders no response tokens for assistant turn {turn} (nothing to "
                    "train on); check the template's assistant branch or use prompt_style=alpaca"
                )
            labels[start:end] = full[start:end]
        if not self.train_on_responses_only:
            labels = list(full)
        return Encoded(list(full), labels, prompt_tokens or 0, mismatch)

    def _encode_marked(self, messages: Sequence[dict[str, str]], where: str) -> Encoded:
        """Labels from the template's ``{% generation %}`` blocks (transformers' assistant-tokens mask)."""
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            out = self.tokenizer.apply_chat_template(
                clean, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception as err:  # jinja TemplateError, or a template's raise_exception
            raise DataError(
                f"{where}: the chat template failed ({first_line(err)}); fix the row or use prompt_style=alpaca"
            ) from err
        full = list(out["input_ids"])
        spans = [trim_span(full, s, e, self.is_blank, leading=True) for s, e in assistant_spans(out["assistant_masks"])]
        spans = [(s, e) for s, e in spans if e > s]
        if not spans:
            raise DataError(
                f"{where}: the chat template's {{% generation %}} blocks mark no tokens of this conversation; wrap "
                "the assistant turns (and their end-of-turn token) in them, or use prompt_style=alpaca"
            )
        labels = [IGNORE_INDEX] * len(full)
        for start, end in spans:
            labels[start:end] = full[start:end]
        if not self.train_on_responses_only:
            labels = list(full)
        return Encoded(full, labels, spans[0][0])

    def is_blank(self, token_id: int) -> bool:
        """Whether ``token_id`` decodes to whitespace only (cached per encoder)."""
        if token_id not in self._blank:
            self._blank[token_id] = self.tokenizer.decode([token_id]).strip() == ""
        return self._blank[token_id]
