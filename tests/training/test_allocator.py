"""CPU training keeps freed memory for the next step: the same allocations stop page-faulting."""

import os
import subprocess
import sys

import pytest

from lorakit.training.allocator import keep_freed_memory

# A training step's pattern: blocks of the sizes this step's rows need (1-30 MB, changing from step to step, as
# activations do with rows of varying length) allocated, written and freed again.
STEPS = """
import resource, sys, torch
from lorakit.training.allocator import keep_freed_memory
applied = keep_freed_memory(sys.argv[1])
def step(k):
    blocks = [torch.empty((1 + (k * 7 + i * 3) % 30) * 262_144).fill_(1.0) for i in range(6)]
    del blocks
for k in range(3):
    step(k)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(40):
    step(k)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
STEP_PAGES = 6 * 15 * 2**20 // 4096  # what one step touches on average: ~23,000 pages


def page_faults(device: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", STEPS, device], capture_output=True, text=True, check=True,
                         env={**clean, "OMP_NUM_THREADS": "1"}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = page_faults("cpu")
    not_applied, default = page_faults("cuda")  # not a CPU run: glibc's defaults stay
    assert (applied, not_applied) == ("True", "False")
    # 40 steps after the warm-up: with the blocks kept, less than one step's pages in all (measured 0-5,600);
    # with glibc's defaults, steps fault their blocks in again (measured 45,000-200,000: it varies with where
    # glibc's moving mmap threshold stands).
    assert kept < STEP_PAGES
    assert default > kept + STEP_PAGES


def test_the_users_own_malloc_settings_are_kept(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory("cpu") is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")  # another allocator altogether
    assert keep_freed_memory("cpu") is False
