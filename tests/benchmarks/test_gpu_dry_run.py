"""benchmarks/gpu.py on a CPU at test size: the code path the GPU run takes, end to end, in one short run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_runs_its_variants_and_writes_json_and_table(tmp_path):
    variants = "lora,lora-trl,qlora"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "3", "--warmup", "1", "--seq",
                           "256", "--rows", "48", "--variants", variants, "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    results = report["results"]
    assert list(results) == variants.split(",")
    for name in ("lora", "lora-trl", "qlora"):
        result = results[name]
        assert result["measured_steps"] == 2 and result["tokens"] > 0 and result["tokens_per_s"] > 0, result
        assert result["frozen_matmul_params"] > 0 and result["model_flops"] > 4 * result["frozen_matmul_params"]
        assert result["final_loss"] is not None
    # lorakit's runs carry the memory estimate for their recipe, set against the measured peak (RSS here).
    assert results["lora"]["estimate"] > 0 and results["lora"]["measured_peak"] > 0
    table = (tmp_path / "gpu.md").read_text()
    # On a CPU, lorakit's packed rows take its per-document attention (on the GPU: flash attention, else sdpa).
    assert "| lora | lorakit_packed_sdpa |" in table and "| lora-trl | sdpa |" in table
    assert "x plain trl" in table and "MFU =" in report["mfu_formula"]
