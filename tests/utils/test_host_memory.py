"""Keeping freed host memory: glibc malloc thresholds, measured as page faults in a fresh process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lightning_qlora.utils.host_memory import keep_freed_host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A training step in miniature: large tensors allocated, written and freed in a mixed order, again and again.
STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from lightning_qlora.utils.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory() is None
def step():
    a = torch.empty(3 << 20, dtype=torch.float32).fill_(1.0)
    b = torch.empty(300_000, dtype=torch.float32).fill_(2.0)
    del a
    c = torch.empty(50 << 20, dtype=torch.uint8).fill_(3)
    del b, c
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_reused_memory_is_not_faulted_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 20 * (50 << 20) // 4096 // 2  # glibc's defaults: the 50 MiB block is faulted in on every step
    assert kept < default // 50  # kept: the same pages serve every step


def test_thresholds_must_be_byte_counts_malloc_takes():
    for bad in (0, -1, 1 << 31, 1.5):
        with pytest.raises(ValueError, match="must be a number of bytes") as err:
            keep_freed_host_memory(mmap_threshold=bad)
        assert "\n" not in str(err.value)


@pytest.mark.skipif(GLIBC, reason="only where the C library is not glibc")
def test_elsewhere_it_says_why_not():
    assert "not glibc" in keep_freed_host_memory()
