"""Several processes through the real launcher (accelerate -> torchrun, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (assert_same_adapter, facts_rows, fast_training, interrupt_after, logged_losses,
                      subprocess_env, write_jsonl)
from lorakit.training.launch import incompatibility, launch_command
from lorakit.recipe import RecipeError, load_recipe

ACCELERATE_DIR = Path(__file__).parents[2] / "recipes" / "accelerate"


@pytest.mark.slow
def test_two_cpu_processes_train_once_with_the_global_batch(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages", repeat=4))  # 32 rows
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
model: {{name_or_path: {tiny_llama}}}
data: {{train: [{data}], max_length: 64}}
lora: {{lora_dropout: 0.0}}
training:
  output_dir: {tmp_path / 'out'}
  packing: false
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 2
  num_train_epochs: 3
  learning_rate: 5.0e-3
  warmup_steps: 0
  logging_steps: 1
  save_strategy: "no"
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lorakit", "sft", str(recipe), "--num-processes", "2",
                             "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "accelerate.commands.launch" in output and "--num_processes 2" in output
    # One summary, from the main process only, counting both processes in the batch.
    assert output.count("lorakit sft\n") == 1
    assert "16 sequences per step = 4 per device x 2 accumulation x 2 process(es)" in output
    # Both processes hold a model in the same RAM: the memory lines say whose figure they give.
    assert "of RAM for each of the 2 processes at the peak (estimate" in output
    assert "(RAM, the main one of 2 processes, each about as much)" in output
    out = tmp_path / "out"
    record = json.loads((out / "lorakit_run.json").read_text())
    assert record["status"] == "completed"
    # 32 rows / (4 per device x 2 processes x 2 accumulation) = 2 steps per epoch, 3 epochs.
    assert record["planned_steps"] == 6
    assert max(e["step"] for e in record["log_history"]) == 6
    losses = [e["loss"] for e in record["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)


def test_launch_command_goes_through_accelerate():
    command = launch_command(["r.yaml", "lora.r=8"], 4, None)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4" and "--multi_gpu" in command
    assert command[-5:] == ["-m", "lorakit", "sft", "r.yaml", "lora.r=8"]
    multi = launch_command(["r.yaml"], 16, "cfg.yaml", num_machines=2, machine_rank=1, main_process_ip="host0")
    assert multi[multi.index("--machine_rank") + 1] == "1" and multi[multi.index("--main_process_ip") + 1] == "host0"
    assert "--multi_gpu" not in multi  # the config says how to distribute


@pytest.mark.parametrize("config, quantization, expected", [
    ("fsdp2.yaml", {"load_in_8bit": True}, "8-bit (LLM.int8) weights cannot be sharded by FSDP"),
    ("deepspeed-zero3.yaml", {"load_in_8bit": True}, "8-bit weights cannot be partitioned by ZeRO-3"),
    ("fsdp2-qlora.yaml", {"load_in_4bit": True, "bnb_4bit_quant_storage": "uint8",
                          "bnb_4bit_compute_dtype": "bfloat16"}, "set quantization.bnb_4bit_quant_storage equal"),
    ("fsdp2-qlora.yaml", {"load_in_4bit": True}, None),
    ("deepspeed-zero3.yaml", {"load_in_4bit": True}, None),
    ("ddp.yaml", {"load_in_8bit": True}, None),
])
def test_impossible_combinations_are_refused(config, quantization, expected):
    message = incompatibility(ACCELERATE_DIR / config, quantization)
    if expected is None:
        assert message is None
    else:
        assert expected in message


def test_zero3_offload_with_qlora_is_refused_at_validation(tmp_path, write_recipe):
    config = tmp_path / "zero3-offload.yaml"
    config.write_text((ACCELERATE_DIR / "deepspeed-zero3.yaml").read_text().replace(
        "offload_param_device: none", "offload_param_device: cpu"))
    data = write_jsonl(tmp_path / "t.jsonl", facts_rows("text", 1))
    path = write_recipe(f"""\
        model: owner/model
        quantization: {{load_in_4bit: true}}
        data: {{train: {data}}}
        launch: {{accelerate_config: {config}}}
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (problem,) = info.value.problems
    assert str(problem).startswith("launch.accelerate_config (line 4): QLoRA with ZeRO-3 parameter offload")


def test_shipped_accelerate_configs_are_valid_yaml_with_a_command():
    import yaml

    for path in ACCELERATE_DIR.glob("*.yaml"):
        text = path.read_text()
        assert "lorakit sft" in text.splitlines()[1] or "lorakit sft" in text.splitlines()[2], path
        assert yaml.safe_load(text)["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED"), path


@pytest.mark.slow
def test_sigterm_to_the_launching_process_stops_every_worker_resumably(tiny_llama, tmp_path):
    """A scheduler that signals only the process it started (`lorakit sft --num-processes 2`, not its group):
    the signal reaches both workers, they checkpoint the same step, the command exits 75, and the rerun resumes
    to the same losses and adapter as a two-process run never stopped."""
    from lorakit.training import run_dir

    steps = 12
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages", repeat=4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_llama}}}\ndata: {{train: [{data}], max_length: 64}}\n"
                      + fast_training(tmp_path / "out", steps), encoding="utf-8")
    env = {**subprocess_env(tmp_path), "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "lorakit", "sft", str(recipe), "--num-processes", "2", "--device", "cpu",
                "--output-dir", str(out), "training.per_device_train_batch_size=4", "training.disable_tqdm=true"]

    never_stopped = tmp_path / "never-stopped"
    result = subprocess.run(command(never_stopped), capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = tmp_path / "out"
    err = interrupt_after(command(out), env, 3)  # SIGTERM to the launching process only; checks exit status 75
    record = run_dir.read_record(out)
    assert record["status"] == run_dir.INTERRUPTED, err[-2000:]
    stopped = record["interrupted"]["step"]
    assert 3 <= stopped < steps
    assert [c.name for c in run_dir.complete_checkpoints(out)] == [f"checkpoint-{stopped}"]
    # Both workers stopped; the main one says so once.
    assert err.count(f"stopped by SIGTERM at step {stopped} of {steps}") == 1
    assert err.count("SIGTERM received: saving a checkpoint") == 1

    rerun = subprocess.run(command(out), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from checkpoint-{stopped}" in rerun.stdout + rerun.stderr
    assert run_dir.read_record(out)["status"] == run_dir.COMPLETED
    assert logged_losses(out) == logged_losses(never_stopped)
    assert_same_adapter(out, never_stopped)
