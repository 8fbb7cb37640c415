"""Sizes as people read them in tables and messages."""

from __future__ import annotations

GIB = 2**30
MIB = 2**20


def format_bytes(n: float) -> str:
    """``1.25 GiB`` from one GiB up, else ``812.0 MiB``."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"
