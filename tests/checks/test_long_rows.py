"""Rows too long for data.max_length or for the model itself: each told once, and the length capped at the
model's max_position_embeddings with a warning (validate) and in training."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import facts_rows, write_jsonl
from lorakit.cli import main

LONG_ROW = {"messages": [{"role": "user", "content": "What colour is the sky? " * 20},
                         {"role": "assistant", "content": "The sky is blue. " * 10}]}


def write(tmp_path, model, rows, max_length: int) -> str:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\ndata:\n  train: {data}\n  max_length: {max_length}\n"
                      f"training:\n  max_steps: 1\n  output_dir: {tmp_path / 'out'}\n")
    return str(recipe)


def test_a_row_cut_to_nothing_is_reported_once(tiny_llama, tmp_path):
    recipe = write(tmp_path, tiny_llama, facts_rows("messages", repeat=1) + [LONG_ROW], max_length=64)
    result = CliRunner().invoke(main, ["validate", recipe, "--samples", "0"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("  warning")]
    assert warnings == ["  warning  train: 1 rows are left out: none of their tokens is trained within "
                        "data.max_length=64"]


def test_a_max_length_past_the_models_positions_is_warned_and_capped(tiny_llama, tmp_path):
    recipe = write(tmp_path, tiny_llama, facts_rows("messages"), max_length=512)
    result = CliRunner().invoke(main, ["validate", recipe, "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert ("data.max_length=512 is more than the model's max_position_embeddings=256: rows are cut at 256 "
            "tokens instead") in result.output
    assert "(data.max_length 256)" in result.output  # the data report already counts with the cap


@pytest.mark.slow
def test_training_caps_the_length_at_the_models_positions(tiny_llama, tmp_path):
    recipe = write(tmp_path, tiny_llama, facts_rows("messages") + [{"messages": [
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "The sky is blue. " * 60}]}], max_length=4096)
    result = CliRunner().invoke(main, ["sft", recipe], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "max_position_embeddings=256" in result.output
    record = json.loads((tmp_path / "out" / "lorakit_run.json").read_text())
    assert record["data"]["train"]["truncated"] == 1  # cut at the model's 256 positions, its start still trained
    assert "max_length: 256" in (tmp_path / "out" / "lorakit_recipe.yaml").read_text()
