"""validate estimates memory for the device `lorakit sft` would run on: the CPU on a machine without a GPU."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import facts_rows, write_jsonl
from lorakit.cli import main


def cpu_recipe(tiny_llama, tmp_path):
    """A recipe for the tiny model, on a machine whose default estimate is for its CPU (else the test skips)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the default estimate is for it")
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_llama}\ndata:\n  train: {data}\n  max_length: 64\n")
    return recipe


def test_without_a_gpu_the_estimate_is_for_the_cpu_unless_a_gpu_is_named(tiny_llama, tmp_path):
    recipe = cpu_recipe(tiny_llama, tmp_path)
    here = CliRunner().invoke(main, ["validate", str(recipe), "--samples", "0"])
    assert here.exit_code == 0, here.output
    assert "this machine has no GPU, so the estimate is for a run on its CPU" in here.output
    assert "peak on CPU RAM: LoRA, float32" in here.output and "fits GPUs of" not in here.output
    for flags in (["--gpu-memory", "24GiB"], ["--device", "cuda"]):
        gpu = CliRunner().invoke(main, ["validate", str(recipe), "--samples", "0", *flags])
        assert gpu.exit_code == 0, gpu.output
        assert "peak on one GPU: LoRA, bfloat16" in gpu.output


def test_cpu_processes_share_one_ram_and_a_run_too_big_for_it_is_named(tiny_llama, tmp_path, monkeypatch):
    import re

    from lorakit.checks import memory

    recipe = cpu_recipe(tiny_llama, tmp_path)
    one = CliRunner().invoke(main, ["validate", str(recipe), "--samples", "0"])
    two = CliRunner().invoke(main, ["validate", str(recipe), "--samples", "0", "--num-processes", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output

    def total(output: str) -> str:
        return re.search(r"^\s+total\s+(.+)$", output, re.M).group(1).strip()

    assert total(one.output) == total(two.output)  # each process's own peak
    assert re.search(r"x 2 processes, one RAM\s+\S+", two.output) and "one RAM" not in one.output
    assert "more than this machine's" not in two.output
    monkeypatch.setattr(memory, "machine_ram", lambda: 64 * 2**20)  # a machine with 64 MiB
    small = CliRunner().invoke(main, ["validate", str(recipe), "--samples", "0", "--num-processes", "2"])
    assert "is more than this machine's 64 MiB of RAM: the run would swap or be stopped" in small.output
    assert "or fewer processes (--num-processes)" in small.output
