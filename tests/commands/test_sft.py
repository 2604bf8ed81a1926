"""`lorakit sft` end to end through the CLI on tiny models: the adapter loads with plain peft and the loss fell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import facts_rows, fast_training, write_jsonl
from lorakit.cli import main
from lorakit.training.run_dir import MANIFEST_FILE, RECIPE_FILE, RECORD_FILE

EXPECTED_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", RECIPE_FILE, RECORD_FILE, MANIFEST_FILE, "README.md", "loss.png",
                  "generation_config.json"}


def write_run_recipe(tmp_path: Path, model: Path, fmt: str = "messages", extra: str = "", steps: int = 12) -> Path:
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", facts_rows(fmt))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {model}\ndata:\n  train:\n    - path: {data}\n  max_length: 64\n"
                      f"{extra}{fast_training(tmp_path / 'out', steps)}")
    return recipe


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def losses(out: Path) -> list[float]:
    record = json.loads((out / RECORD_FILE).read_text())
    return [entry["loss"] for entry in record["log_history"] if "loss" in entry]


def assert_adapter_loads_with_plain_peft(base: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    lora_weights = [name for name, _ in model.named_parameters() if "lora_B" in name]
    assert lora_weights, "no LoRA weights were loaded"
    # A trained adapter has moved B away from its zero initialisation.
    assert any(param.abs().sum() > 0 for name, param in model.named_parameters() if "lora_B" in name)


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion", "text"])
def test_sft_trains_every_format_and_writes_a_loadable_adapter(tiny_llama, tmp_path, fmt):
    recipe = write_run_recipe(tmp_path, tiny_llama, fmt)
    result = run_cli("sft", str(recipe))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert set(p.name for p in out.iterdir()) == EXPECTED_FILES
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pth"))
    history = losses(out)
    assert history[-1] < history[0], history
    assert_adapter_loads_with_plain_peft(tiny_llama, out)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["status"] == "completed" and record["versions"]["peft"]
    assert record["data"]["train"]["sources"][0]["format"] == fmt
    assert record["data"]["train"]["sources"][0]["fingerprint"].startswith("sha256:")
    # The summary screen comes before training.
    for line in ("trainable", "train data", "batch", "steps", "quantization"):
        assert f"  {line}" in result.output


def test_resolved_recipe_reruns_as_is(tiny_llama, tmp_path):
    recipe = write_run_recipe(tmp_path, tiny_llama, steps=2)
    assert run_cli("sft", str(recipe)).exit_code == 0
    rerun = tmp_path / "rerun"
    result = run_cli("sft", str(tmp_path / "out" / RECIPE_FILE), "--output-dir", str(rerun))
    assert result.exit_code == 0, result.output
    assert (rerun / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu(tiny_llama, tmp_path):
    recipe = write_run_recipe(tmp_path, tiny_llama, extra="quantization:\n  load_in_4bit: true\n", steps=15)
    result = run_cli("sft", str(recipe))
    assert result.exit_code == 0, result.output
    assert "4-bit nf4 (QLoRA)" in result.output
    out = tmp_path / "out"
    history = losses(out)
    assert history[-1] < history[0], history
    assert_adapter_loads_with_plain_peft(tiny_llama, out)


@pytest.mark.slow
def test_qwen2_without_packing(tiny_qwen, tmp_path):
    recipe = write_run_recipe(tmp_path, tiny_qwen)
    result = run_cli("sft", str(recipe), "training.packing=false")
    assert result.exit_code == 0, result.output
    assert ", packed" not in result.output
    history = losses(tmp_path / "out")
    assert history[-1] < history[0], history
    assert_adapter_loads_with_plain_peft(tiny_qwen, tmp_path / "out")


def test_packed_and_unpacked_batches_give_the_same_loss(tiny_llama, tmp_path):
    """Packing is only a default because packed sequences do not see each other: check the first-step loss."""
    first = {}
    for packing in ("true", "false"):
        recipe = write_run_recipe(tmp_path, tiny_llama, steps=1)
        out = tmp_path / f"out-{packing}"
        result = run_cli("sft", str(recipe), f"training.packing={packing}", "--output-dir", str(out),
                         "training.per_device_train_batch_size=32", "lora.lora_dropout=0.0")
        assert result.exit_code == 0, result.output
        first[packing] = losses(out)[0]
        if packing == "true":  # on a CPU: the micro-batch as one row, its attention document by document
            assert "packed rows attend document by document" in result.output
            assert "32 sequences per step = 32 per device x 1 accumulation" in result.output
        assert "fewer passes" in result.output and "RMSNorm, rotary embeddings, LoRA sum" in result.output
    assert first["true"] == pytest.approx(first["false"], rel=1e-4)


def test_recipe_mistakes_exit_2_with_the_key_and_no_traceback(tiny_llama, tmp_path):
    recipe = write_run_recipe(tmp_path, tiny_llama, extra="lora:\n  rank: 8\n")
    result = CliRunner().invoke(main, ["sft", str(recipe)])
    assert result.exit_code == 2
    assert "lora.rank (line 8): unknown key; did you mean lora.r?" in result.output
    assert "Traceback" not in result.output


def test_bad_data_row_exits_2_naming_file_and_row(tiny_llama, tmp_path):
    recipe = write_run_recipe(tmp_path, tiny_llama)
    data = tmp_path / "messages.jsonl"
    data.write_text(data.read_text() + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = CliRunner().invoke(main, ["sft", str(recipe)])
    assert result.exit_code == 2
    assert f"{data}: row 33: has no assistant turn to learn from" in result.output
    assert not (tmp_path / "out").exists()


def test_output_folder_is_never_clobbered(tiny_llama, tmp_path):
    recipe = write_run_recipe(tmp_path, tiny_llama, steps=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["sft", str(recipe), "--overwrite"])
    assert result.exit_code == 2 and "is not a lorakit run" in result.output
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    assert run_cli("sft", str(recipe)).exit_code == 0
    again = CliRunner().invoke(main, ["sft", str(recipe), "lora.r=4"])
    assert again.exit_code == 2 and "already holds a finished run of a different recipe" in again.output
    assert run_cli("sft", str(recipe), "lora.r=4", "--overwrite").exit_code == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_help_lists_commands_without_importing_torch():
    code = ("import sys; from lorakit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "sft" in result.stdout


def test_python_dash_m_lorakit_works():
    result = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "lorakit" in result.stdout
