"""The one line of an exception that error messages quote."""

from __future__ import annotations


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``err``'s message (its type name when the message is empty), cut to ``limit``."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line[:limit] if limit else line
