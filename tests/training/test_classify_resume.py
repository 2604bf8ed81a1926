"""lorakit classify resumes exactly: a run stopped by SIGTERM and run again ends as one never stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import assert_same_adapter, interrupt_after, subprocess_env, write_jsonl
from lorakit.training import run_dir

STEPS = 12


def write_run_recipe(folder: Path, model: Path, out: Path) -> Path:
    import random

    rng = random.Random(0)
    words = {"sky": ["sky", "blue", "Mars"], "water": ["water", "fish", "ice"]}
    rows = [{"text": " ".join(rng.choices(words[label], k=3) + ["the", "is"]), "label": label}
            for label in ("sky", "water") for _ in range(40)]
    rng.shuffle(rows)
    data = write_jsonl(folder / "train.jsonl", rows)
    recipe = folder / "recipe.yaml"
    # LoRA dropout on and a held-out split evaluated and saved every 4 steps: the comparison covers the restored
    # random state, the data position and which checkpoint is best.
    recipe.write_text(f"""\
# lorakit classify recipe.yaml
model:
  name_or_path: {model}
lora:
  r: 4
  lora_alpha: 8
  lora_dropout: 0.1
data:
  train: {data}
  eval_fraction: 0.2
  max_length: 32
training:
  output_dir: {out}
  max_steps: {STEPS}
  per_device_train_batch_size: 8
  learning_rate: 5.0e-3
  warmup_steps: 0
  logging_steps: 1
  eval_steps: 4
  seed: 0
  disable_tqdm: true
""", encoding="utf-8")
    return recipe


def history(out: Path) -> list[tuple]:
    record = run_dir.read_record(out)
    return [(entry["step"], entry.get("loss"), entry.get("eval_f1_macro")) for entry in record["log_history"]
            if "loss" in entry or "eval_f1_macro" in entry]


# The tiny model's steps take milliseconds, so the run would be over before the signal is sent: each step is paced
# by a sleep before it (the arithmetic is untouched), and the signal lands mid-run.
PACED = """
import time
from transformers import Trainer
from lorakit.cli import main
training_step = Trainer.training_step
def paced(self, *args, **kwargs):
    time.sleep(0.3)
    return training_step(self, *args, **kwargs)
Trainer.training_step = paced
main(["classify", {recipe!r}])
"""


@pytest.mark.slow
def test_sigterm_then_rerun_gives_the_uninterrupted_losses_and_adapter(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from lorakit.cli import main

    (tmp_path / "whole").mkdir()
    whole = tmp_path / "whole" / "out"
    result = CliRunner().invoke(main, ["classify", str(write_run_recipe(tmp_path / "whole", tiny_llama, whole))])
    assert result.exit_code == 0, result.output

    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out)
    # Stopped after step 6: past the first evaluation and checkpoint (step 4), before the second.
    interrupt_after([sys.executable, "-c", PACED.format(recipe=str(recipe))], subprocess_env(tmp_path), 6)
    stopped = run_dir.read_record(out)["interrupted"]["step"]
    assert 6 <= stopped < STEPS

    result = CliRunner().invoke(main, ["classify", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"resuming from checkpoint-{stopped}" in result.output
    assert history(out) == history(whole)  # every loss and eval figure, bitwise on CPU
    assert_same_adapter(out, whole)
    assert (out / "lorakit_task.json").read_text() == (whole / "lorakit_task.json").read_text()
