"""glibc malloc settings for training on a CPU: freed tensor memory kept for the next step, not handed back.

PyTorch's CPU tensors come from malloc. glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB)
with fresh mmaps, unmapped again when freed, and hands the top of its heap back to the kernel once 128 KiB or
more of it is free. A training step frees and re-allocates the same activations, logits and gradients every
step, so with those defaults every step page-faults its working set in again, zero-filled by the kernel: on the
quickstart, 3.5-3.9 million page faults in 60 steps and 10 of its 64 CPU seconds in the kernel. With freed
memory kept (mmap threshold fixed at 32 MiB, heap top kept up to 1 GiB, the heap grown 256 MiB at a time), the
same 60 steps took 23-27 s of training instead of 28-32 s (1.15-1.28x), 0.3 million faults, 2 s in the
kernel, the same losses, and a peak RSS 15-20% higher (docs/benchmarks.md). A process that sets its own
`MALLOC_*` variables, `GLIBC_TUNABLES` or another allocator (`LD_PRELOAD`) keeps them; on a C library other than
glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MIB = 1024 * 1024
MMAP_THRESHOLD = 32 * MIB  # glibc's largest: larger blocks are always mmapped, smaller ones come from its heap
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, 1024 * MIB),
            (M_TOP_PAD, 256 * MIB))
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX",
                 "GLIBC_TUNABLES", "LD_PRELOAD")  # LD_PRELOAD: jemalloc or tcmalloc in place of glibc's malloc


def keep_freed_memory(device: str) -> bool:
    """On a CPU under glibc, keep freed memory for reuse; True where the settings were applied."""
    if device != "cpu" or not sys.platform.startswith("linux") or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt, for one, does nothing
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
