"""CPU training keeps freed memory for the next step: the same allocations stop page-faulting."""

import os
import subprocess
import sys

import pytest

from lorakit.training.allocator import keep_freed_memory

# A training step's pattern: the same large blocks allocated, written and freed again, step after step.
STEPS = """
import resource, sys, torch
from lorakit.training.allocator import keep_freed_memory
applied = keep_freed_memory(sys.argv[1])
def step():
    blocks = [torch.empty(5_000_000).fill_(1.0) for _ in range(4)]  # 20 MB each, over glibc's 128 KiB defaults
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(device: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", STEPS, device], capture_output=True, text=True, check=True,
                         env={**clean, "OMP_NUM_THREADS": "1", **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = page_faults("cpu")
    not_applied, default = page_faults("cuda")  # not a CPU run: glibc's defaults stay
    assert (applied, not_applied) == ("True", "False")
    # 40 steps x 80 MB faulted in again is ~780,000 pages with glibc's defaults; reused blocks fault only while
    # the heap first grows (~20,000-35,000 pages here, however many steps follow).
    assert default > 400_000
    assert kept < default / 10


def test_the_users_own_malloc_settings_are_kept(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory("cpu") is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")  # another allocator altogether
    assert keep_freed_memory("cpu") is False
