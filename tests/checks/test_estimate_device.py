"""validate estimates memory for the device `lorakit sft` would run on: the CPU on a machine without a GPU."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import facts_rows, write_jsonl
from lorakit.cli import main


def test_without_a_gpu_the_estimate_is_for_the_cpu_unless_a_gpu_is_named(tiny_llama, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the default estimate is for it")
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_llama}\ndata:\n  train: {data}\n  max_length: 64\n")
    here = CliRunner().invoke(main, ["validate", str(recipe), "--samples", "0"])
    assert here.exit_code == 0, here.output
    assert "this machine has no GPU, so the estimate is for a run on its CPU" in here.output
    assert "peak on CPU RAM: LoRA, float32" in here.output and "fits GPUs of" not in here.output
    for flags in (["--gpu-memory", "24GiB"], ["--device", "cuda"]):
        gpu = CliRunner().invoke(main, ["validate", str(recipe), "--samples", "0", *flags])
        assert gpu.exit_code == 0, gpu.output
        assert "peak on one GPU: LoRA, bfloat16" in gpu.output
