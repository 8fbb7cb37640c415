"""Keep freed host memory for reuse: glibc ``malloc`` thresholds for CPU training.

A CPU training step allocates and frees the same large tensors every step. By default glibc gives freed blocks above
its mmap threshold (and the heap's free top above its trim threshold) back to the kernel, so the next step takes a
page fault for every 4 KiB of them again: ~235,000 faults a step on the demo's model at 4 × 256 tokens, several
hundred milliseconds of a ~5 s step on 2 cores. Raising both thresholds makes ``malloc`` keep that memory and reuse
it. (torch's CPU allocator has no cache of its own; jemalloc or tcmalloc preloaded does the same from outside.)

The setting is process-wide and stays for the life of the process (what it changes is only when freed memory is
returned to the kernel, never what any allocation holds); it is glibc's, so elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
"""glibc ``mallopt`` parameter: free memory at the top of the heap above this is returned to the kernel."""
M_MMAP_THRESHOLD = -3
"""glibc ``mallopt`` parameter: blocks at least this large are mapped (and unmapped when freed) on their own."""

DEFAULT_MMAP_THRESHOLD = 1 << 30
"""1 GiB: every tensor a small-model CPU step allocates (the loss's logits chunk included) comes from the heap."""
DEFAULT_TRIM_THRESHOLD = (1 << 31) - 1
"""2 GiB (the largest value ``mallopt`` takes): freed heap memory is kept up to that much."""

_LARGEST = (1 << 31) - 1  # mallopt's value is a C int

_applied: tuple[int, int] | None = None


def keep_freed_host_memory(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> str | None:
    """Have glibc's ``malloc`` keep freed memory for reuse instead of returning it to the kernel.

    Args:
        mmap_threshold: blocks at least this many bytes are still mapped on their own (and unmapped when freed).
        trim_threshold: free memory at the top of the heap beyond this many bytes is still returned.

    Returns:
        ``None`` when the thresholds are set (now or by an earlier call), else why not, in one line.

    Raises:
        ValueError: for a threshold that is not a positive number of bytes.
    """
    global _applied
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or not 0 < value <= _LARGEST:
            raise ValueError(f"{name}={value!r} must be a number of bytes in 1..{_LARGEST}, e.g. {1 << 30} (1 GiB)")
    if _applied == (mmap_threshold, trim_threshold):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"the C library is not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return "this process's C library has no mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        return f"glibc refused M_MMAP_THRESHOLD={mmap_threshold}"
    if not mallopt(M_TRIM_THRESHOLD, trim_threshold):
        return f"glibc refused M_TRIM_THRESHOLD={trim_threshold}"
    _applied = (mmap_threshold, trim_threshold)
    return None


__all__ = ["DEFAULT_MMAP_THRESHOLD", "DEFAULT_TRIM_THRESHOLD", "keep_freed_host_memory"]
