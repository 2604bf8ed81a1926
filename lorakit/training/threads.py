"""How many threads PyTorch trains with on a CPU: the cores the machine's other processes leave free.

PyTorch runs its CPU kernels on OpenMP threads, one per core by default, and each operation ends at a barrier
where every thread waits for the slowest. On a quiet machine that is the fastest setting. Beside another busy
process (a compile, a test suite, a second training job) the kernel keeps descheduling one of the threads, and
the others wait for it at every barrier, spinning first (libgomp's default wait policy) and then sleeping: on 2
cores beside one CPU-bound neighbour, 2 threads trained the benchmark job several times slower than 1 thread did
(docs/benchmarks.md). So on a CPU lorakit measures how much CPU time the other processes take on the cores it may
use, and trains with the cores left over (at least one); it measures again every few seconds while training,
because neighbours come and go, and moves the thread count with them.

The wait policy itself (OMP_WAIT_POLICY) is read once, when PyTorch loads libgomp, which a training command has
done long before it could choose; keeping every thread on a free core is what makes the policy harmless. An
explicit OMP_NUM_THREADS (or a launcher that sets it, as accelerate and torchrun do for several processes) is
the user's choice, and lorakit leaves it alone.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

RECHECK_SECONDS = 3.0  # how often training measures the neighbours again: a few steps, a negligible read
SHORTEST_WINDOW = 0.5  # seconds: shorter windows are too noisy to decide on


@dataclass
class CpuTimes:
    """CPU seconds spent so far on the cores this process may use: by everyone, and by this process."""

    busy: float
    own: float
    at: float  # time.monotonic() of the reading


def usable_cores() -> int:
    """Cores this process may run on: its affinity, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def read_cpu_times() -> CpuTimes | None:
    """From /proc/stat (Linux); None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy_ticks = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if mine is not None and int(name[3:]) not in mine:
            continue
        ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
        # Time stolen by the hypervisor is a core taken by someone else, as far as this process can tell.
        busy_ticks += sum(ticks) - ticks[3] - ticks[4]
    times = os.times()
    return CpuTimes(busy=busy_ticks / os.sysconf("SC_CLK_TCK"), own=times.user + times.system, at=time.monotonic())


def threads_for(before: CpuTimes, after: CpuTimes, cores: int) -> int | None:
    """The thread count for the cores the others left free between two readings (None: window too short)."""
    elapsed = after.at - before.at
    if elapsed < SHORTEST_WINDOW:
        return None
    others = max(0.0, (after.busy - before.busy) - (after.own - before.own)) / elapsed
    # Half a free core counts: a thread there still does more good than its barrier waits cost.
    return max(1, min(cores, math.floor(cores - others + 0.5)))


def follow_free_cores(placement) -> list:
    """For a CPU run, the trainer callback that sets PyTorch's thread count to the free cores at the start of
    training and keeps it there; nothing on other devices, where OMP_NUM_THREADS is set, or without /proc/stat."""
    if placement.device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return []
    start = read_cpu_times()
    if start is None:
        return []
    from transformers import TrainerCallback

    class FollowFreeCores(TrainerCallback):
        """Measures the neighbours over the time since the last reading and moves the thread count with them."""

        def __init__(self) -> None:
            self.cores = usable_cores()
            self.last = start  # the first window is the run's preparation (data, model), before any step
            self.hinted = False

        def update(self) -> None:
            import torch

            now = read_cpu_times()
            wanted = threads_for(self.last, now, self.cores) if now else None
            if wanted is None:
                return
            self.last = now
            if wanted != torch.get_num_threads():
                busy = "other processes keep the CPU busy" if wanted < self.cores else "the CPU is free again"
                click.echo(f"lorakit: {busy}: training on {wanted} of {self.cores} cores")
                if wanted < self.cores and not self.hinted:
                    self.hinted = True
                    click.echo(f"lorakit: --num-processes {self.cores} would train on one thread in each of "
                               f"{self.cores} processes, which keep working beside busy neighbours (a copy of the "
                               "model each; docs/distributed.md)")
                torch.set_num_threads(wanted)

        def on_train_begin(self, args, state, control, **kwargs):
            self.update()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.last.at >= RECHECK_SECONDS:
                self.update()

    return [FollowFreeCores()]
