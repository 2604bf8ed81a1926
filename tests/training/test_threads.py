"""lorakit.training.threads: the CPU thread count follows the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from lorakit.training import threads
from lorakit.training.threads import CpuTimes, threads_for


def test_threads_are_the_cores_the_others_leave():
    before = CpuTimes(busy=100.0, own=10.0, at=0.0)
    quiet = CpuTimes(busy=102.0, own=12.0, at=1.0)  # all the busy time was this process's own
    beside_one = CpuTimes(busy=102.0, own=11.0, at=1.0)  # another process kept one core busy
    crowded = CpuTimes(busy=104.0, own=10.5, at=1.0)  # others took more than there is
    assert threads_for(before, quiet, cores=2) == 2
    assert threads_for(before, beside_one, cores=2) == 1
    assert threads_for(before, beside_one, cores=8) == 7
    assert threads_for(before, crowded, cores=2) == 1  # never fewer than one
    assert threads_for(before, CpuTimes(busy=100.1, own=10.0, at=0.1), cores=2) is None  # too short to tell


def test_only_cpu_runs_without_an_explicit_thread_count_are_steered(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.follow_free_cores(SimpleNamespace(device="cuda")) == []
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.follow_free_cores(SimpleNamespace(device="cpu")) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_beside_busy_neighbours_training_keeps_to_one_thread(monkeypatch, capsys):
    import torch
    from transformers import TrainerCallback  # noqa: F401  (loaded before the neighbours take the CPU)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = threads.usable_cores()
    before = torch.get_num_threads()
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        [callback] = threads.follow_free_cores(SimpleNamespace(device="cpu"))
        time.sleep(1.5)  # the run's preparation, during which the neighbours take every core
        callback.on_train_begin(None, None, None)
        assert torch.get_num_threads() == 1
        said = capsys.readouterr().out
        assert f"training on 1 of {cores} cores" in said
        if cores > 1:  # and how to keep every core working: separate processes, with what they cost
            assert f"--num-processes {cores} would train on one thread in each of {cores} processes" in said
            assert "a copy of the model each" in said
    finally:
        for neighbour in neighbours:
            neighbour.kill()
            neighbour.wait()
        torch.set_num_threads(before)


def test_launched_processes_share_this_machines_cores(monkeypatch, tmp_path):
    from lorakit.training import launch

    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert launch.threads_per_process(2, None, None) == 4
    assert launch.threads_per_process(8, None, None) == 1
    assert launch.threads_per_process(16, 2, None) == 1  # 8 processes on each of 2 machines
    assert launch.threads_per_process(3, None, None) == 2  # never more threads than cores
    assert launch.threads_per_process(32, None, None) == 1  # at least one
    config = tmp_path / "ddp.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\nnum_machines: 1\n")
    assert launch.threads_per_process(None, None, str(config)) == 2
    assert launch.threads_per_process(2, None, str(config)) == 4  # the command line over the config
    config.write_text("num_processes: many\n")  # accelerate rejects it; one process is the guess until then
    assert launch.threads_per_process(None, None, str(config)) == 8
