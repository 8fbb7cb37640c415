"""Reading and validating instruction rows, prompt rendering and response-only label masking.

Rows are read from ``.json``/``.jsonl`` files, ``pkg://`` package resources or ``datasets`` hub names, then
normalized to ``{"role", "content"}`` messages (Alpaca rows become one user and one assistant turn),
rendered with the tokenizer's chat template or the standard Alpaca prompt, and tokenized so that only
assistant turns (plus the end-of-turn token that closes each) carry labels.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning_qlora.utils.errors import first_line

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
_CHAT_KEYS = ("messages", "conversations")
_FILE_SUFFIXES = (".json", ".jsonl")
_LOOKS_LIKE_FILE = (*_FILE_SUFFIXES, ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz", ".zip", ".yaml", ".yml")


class DataError(ValueError):
    """A problem with the training data: a one-line message naming the input and what to do."""


@dataclass
class RowSource:
    """Where rows came from, to name a row in error messages (``data.jsonl line 7``, ``data.json row 3``)."""

    name: str
    lines: list[int] | None = None  # JSONL line numbers (1-based) per row
    zero_based: bool = False

    parts: list[tuple[int, RowSource]] | None = None  # a folder: (first row, source) per file, in order

    def where(self, i: int) -> str:
        """Name row ``i`` (0-based position in the parsed rows)."""
        if self.parts is not None:
            start, part = next((s, p) for s, p in reversed(self.parts) if s <= i)
            return part.where(i - start)
        if self.lines is not None:
            return f"{self.name} line {self.lines[i]}"
        return f"{self.name} {'index' if self.zero_based else 'row'} {i if self.zero_based else i + 1}"


def _parse_text(text: str, name: str, suffix: str) -> tuple[list[Any], RowSource]:
    if suffix == ".jsonl":
        rows, lines = [], []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{name} line {lineno}: invalid JSON ({err.msg}); fix or remove the row") from None
            lines.append(lineno)
        source = RowSource(name, lines)
    else:
        if not text.strip():
            rows = []
        else:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{name}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); fix the file"
                ) from None
        if not isinstance(rows, list):
            raise DataError(f"{name}: expected a JSON list of rows, got {type(rows).__name__}; use a list or .jsonl")
        source = RowSource(name)
    if not rows:
        raise DataError(f"{name}: file is empty (no rows); add rows or point to the right file")
    return rows, source


def _read_text(read: Callable[[], str], name: str) -> str:
    try:
        return read()
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: cannot read file (not UTF-8 text: {err.reason}); save it as UTF-8 JSON") from None
    except OSError as err:
        raise DataError(f"{name}: cannot read file ({err.strerror or first_line(err)}); check permissions") from None


def read_rows(path: str) -> tuple[list[Any], RowSource]:
    """Read raw rows from a local file or folder of files, a ``pkg://package/relative/path`` resource or a hub name.

    Hub names may carry a split as ``name:split`` (default ``train``); they are only tried when ``path`` is
    not an existing local file and does not look like one.

    Args:
        path: The data location.

    Returns:
        The parsed rows and their source (used to name rows in errors).

    Raises:
        DataError: If the file is missing, unreadable, empty, not valid JSON, or the dataset cannot be loaded.
    """
    if path.startswith("pkg://"):
        package, _, rel = path[len("pkg://") :].partition("/")
        try:
            resource = importlib.resources.files(package)
        except (ModuleNotFoundError, TypeError, ValueError):
            raise DataError(f"{path}: package '{package}' is not installed; pip install it or fix the path") from None
        for part in filter(None, rel.split("/")):
            resource = resource / part
        if not rel or not resource.is_file():
            raise DataError(f"{path}: no file '{rel}' in package '{package}'; check the relative path")
        suffix = os.path.splitext(rel)[1].lower()
        if suffix not in _FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{suffix}'; use .json or .jsonl")
        return _parse_text(_read_text(lambda: resource.read_text(encoding="utf-8-sig"), path), path, suffix)
    local = Path(os.path.expanduser(path))
    suffix = local.suffix.lower()
    if local.is_dir():
        return _read_folder(local, path)
    if local.exists() and (local.is_file() or suffix in _FILE_SUFFIXES):
        if suffix not in _FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{suffix}'; use .json (a list of rows) or .jsonl")
        return _parse_text(_read_text(lambda: local.read_text(encoding="utf-8-sig"), path), path, suffix)
    if not local.exists() and (suffix in _LOOKS_LIKE_FILE or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise DataError(f"{path}: file not found (relative paths start at {os.getcwd()}); check the path")
    return _load_hub(path)


def _read_folder(folder: Path, path: str) -> tuple[list[Any], RowSource]:
    """Every ``.json``/``.jsonl`` file under ``folder`` (sorted), each read and validated as it would be alone.

    Hidden files and README/LICENSE files are skipped; any other data file (``.csv``, ``.parquet``, ...) is refused
    as it would be alone, rather than merged through ``datasets`` with its own type guessing.
    """
    files = sorted(
        f for f in folder.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        and not f.name.upper().startswith(("README", "LICENSE"))
    )  # fmt: skip
    for file in files:
        if file.suffix.lower() not in _FILE_SUFFIXES:
            raise DataError(
                f"{path}: folder holds {file.relative_to(folder)}, an unsupported file type; keep only .json/.jsonl "
                "files in it, or point to one file"
            )
    if not files:
        raise DataError(f"{path}: folder has no .json or .jsonl files; point to a data file or a folder of them")
    rows: list[Any] = []
    parts: list[tuple[int, RowSource]] = []
    for file in files:
        name = str(file)
        part_rows, source = _parse_text(_read_text(lambda f=file: f.read_text(encoding="utf-8-sig"), name), name,
                                        file.suffix.lower())  # fmt: skip
        parts.append((len(rows), source))
        rows.extend(part_rows)
    return rows, RowSource(path, parts=parts)


def _load_hub(spec: str) -> tuple[list[Any], RowSource]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: not a local file, and hub datasets need `pip install datasets`") from None
    try:
        rows = datasets.load_dataset(name, split=split or "train").to_list()
    except Exception as err:  # hub, network and builder errors all end here
        raise DataError(
            f"{spec}: not a local file, and datasets.load_dataset failed ({type(err).__name__}: {first_line(err)}); "
            "check the path or dataset name"
        ) from None
    if not rows:
        raise DataError(f"{spec}: dataset split is empty; choose another split with name:split")
    return rows, RowSource(spec, zero_based=True)


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
            messages.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
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

        Args:
            conversations: Normalized messages per row.
            wheres: Location of each row, for error messages.

        Returns:
            One :class:`Encoded` per conversation (untruncated).
        """
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
        return [self._encode_one(ids, plan) for plan in plans]

    def _encode_one(self, ids: list[list[int]], plan: list[tuple[int, int]]) -> Encoded:
        full = ids[plan[0][0]]
        labels = [IGNORE_INDEX] * len(full)
        mismatch, prompt_tokens = False, None
        for prefix_idx, through_idx in plan[1:]:
            prefix = ids[prefix_idx]
            start = _common_prefix(prefix, full)
            end = len(full) if through_idx == plan[0][0] else _common_prefix(ids[through_idx], full)
            mismatch |= start < len(prefix)
            while end > start and self._is_blank(full[end - 1]):
                end -= 1  # whitespace the template puts after the end-of-turn token is not trained
            labels[start:end] = full[start:end]
            prompt_tokens = start if prompt_tokens is None else prompt_tokens
        if not self.train_on_responses_only:
            labels = list(full)
        return Encoded(list(full), labels, prompt_tokens or 0, mismatch)

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank:
            self._blank[token_id] = self.tokenizer.decode([token_id]).strip() == ""
        return self._blank[token_id]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return next(i for i in range(n) if a[i] != b[i])
