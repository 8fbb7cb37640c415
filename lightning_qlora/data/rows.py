"""Reading instruction rows: ``.json``/``.jsonl`` files, folders of them, ``pkg://`` resources, ``datasets`` hub names.

Every problem is one :class:`DataError` line naming the file (and row) and what to do.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_qlora.utils.errors import first_line

__all__ = ["DataError", "RowSource", "read_rows"]

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
