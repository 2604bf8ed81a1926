"""The Python API a notebook uses: lorakit.sft from a dict, then evaluate, generate and merge, each returning what
it produced; the same checks and errors as the command line; `import lorakit` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lorakit
from conftest import facts_rows, write_jsonl
from lorakit.errors import RecipeError


def recipe_dict(model, data, out) -> dict:
    return {"model": str(model), "lora": {"r": 8, "modules_to_save": ["lm_head"]},
            "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 64},
            "training": {"output_dir": str(out), "max_steps": 12, "per_device_train_batch_size": 8,
                         "learning_rate": 1e-2, "warmup_steps": 0, "logging_steps": 2, "save_strategy": "no",
                         "seed": 0}}


@pytest.mark.slow
def test_a_notebook_trains_from_a_dict_then_evaluates_generates_and_merges(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages"))
    run = lorakit.sft(recipe_dict(tiny_llama, data, tmp_path / "run"), training={"max_steps": 16})

    assert run.status == "completed" and run.output_dir == tmp_path / "run"
    assert run.record["planned_steps"] == 16  # the override, merged into the dict's training section
    steps, losses = zip(*run.losses)
    assert steps[-1] == 16 and losses[-1] < losses[0]
    assert run.metrics["eval_loss"] > 0 and run.loss_plot.is_file() and run.card.is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run.output_dir)  # plain peft loads it

    scores = lorakit.evaluate(run.output_dir, compare_base=True, max_new_tokens=12)
    assert scores.metrics["loss"] < scores.base_metrics["loss"]
    assert scores.report_path == run.output_dir / "lorakit_eval.json" and scores.report_path.is_file()
    assert len(scores.examples) == scores.metrics["replies"] > 0

    reply = lorakit.generate(run.output_dir, "What colour is the sky?", system="Answer briefly.", max_new_tokens=12)
    assert isinstance(reply, str) and reply

    merged = lorakit.merge(run.output_dir, output=tmp_path / "merged", dtype="float32")
    assert merged.output_dir == tmp_path / "merged" and (merged.output_dir / "model.safetensors").is_file()
    assert merged.record["check"]["passed"] is True and merged.check["max_abs_diff"] < 1e-3


def test_a_dict_recipe_is_checked_like_a_file_with_paths_from_the_working_directory(tiny_llama, tmp_path,
                                                                                     monkeypatch):
    write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages"))
    monkeypatch.chdir(tmp_path)
    recipe = lorakit.load_recipe({"model": str(tiny_llama), "data": {"train": "facts.jsonl"}},
                                 lora={"r": 4}, training={"max_steps": 3})
    assert recipe.data["train"][0]["path"] == str(tmp_path / "facts.jsonl")
    assert recipe.lora["r"] == 4 and recipe.training["max_steps"] == 3
    with pytest.raises(RecipeError) as info:
        lorakit.load_recipe({"model": str(tiny_llama), "data": {"train": "facts.jsonl"}, "lora": {"rank": 8}})
    assert "lora.rank: unknown key; did you mean lora.r?" in str(info.value)


def test_section_overrides_of_a_recipe_file_are_checked_as_command_line_overrides(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages"))
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {tiny_llama}\ndata:\n  train: {data}\ntraining:\n  max_steps: 5\n")
    assert lorakit.load_recipe(path, training={"learning_rate": 1e-3}).training["learning_rate"] == 1e-3
    with pytest.raises(RecipeError) as info:
        lorakit.load_recipe(path, lora={"r": "eight"})
    assert "lora.r (command line): must be an integer, not 'eight'" in str(info.value)


def test_importing_lorakit_loads_no_heavy_library():
    code = ("import sys, lorakit\nassert callable(lorakit.sft)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
