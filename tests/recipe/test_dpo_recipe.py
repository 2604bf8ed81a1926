"""A dpo recipe is checked as strictly as an sft one: an SFT run folder is a valid start, and what only DPO can
get wrong (a reference without an SFT run, sft-only data keys, trl options that cannot work with LoRA) is named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_adapter_run
from hub_model_shapes import model_config

from lorakit.commands.recipes import read_header
from lorakit.errors import RecipeError
from lorakit.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes" / "dpo").glob("*.yaml"))


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory) -> Path:
    return write_adapter_run(tmp_path_factory.mktemp("runs") / "my-sft", tiny_llama)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n')
    path = tmp_path / "dpo.yaml"
    path.write_text(f"# lorakit dpo dpo.yaml\n{text}\ndata:\n  train:\n    - path: pairs.jsonl\n")
    return path


def problems(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as raised:
        load_recipe(path, overrides, command="dpo")
    return str(raised.value)


def test_an_sft_run_folder_is_a_start_and_its_adapter_shape_is_kept(sft_run, tmp_path):
    recipe = load_recipe(write(tmp_path, f"model: {sft_run}\nlora:\n  r: 64"), command="dpo")
    assert recipe.model["name_or_path"] == str(sft_run)
    assert recipe.lora["r"] == 4 and recipe.lora["lora_alpha"] == 8  # the SFT run's adapter, not the section's
    assert [w.path for w in recipe.warnings] == ["lora"] and "ignored" in recipe.warnings[0].message
    assert recipe.sections["preference"] == {"reference": None, "on_bad_rows": "error"}
    assert recipe.training["learning_rate"] == 5.0e-6  # lorakit's DPO default, not sft's 2e-4
    text = problems(write(tmp_path, f"model: {sft_run}\npreference:\n  reference: base"),
                    "training.precompute_ref_log_probs=true")
    assert "training.precompute_ref_log_probs (command line): not with preference.reference: base" in text
    with pytest.raises(RecipeError, match="holds no config.json"):  # sft cannot start from a run folder
        load_recipe(write(tmp_path, f"model: {sft_run}"), command="sft")


def test_an_unfinished_run_folder_is_refused_with_what_to_do(tiny_llama, tmp_path):
    sft_run = write_adapter_run(tmp_path / "unfinished", tiny_llama)
    (sft_run / "lorakit_run.json").write_text(json.dumps({"status": "interrupted", "command": "sft"}))
    assert re.search(r"model.name_or_path .*a run that is interrupted, not completed; finish it first",
                     problems(write(tmp_path, f"model: {sft_run}")))
    (sft_run / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors: not a finished run" in problems(write(tmp_path, f"model: {sft_run}"))


def test_what_only_dpo_gets_wrong_is_named(tiny_llama, tmp_path):
    text = problems(write(tmp_path, f"model: {tiny_llama}\npreference:\n  reference: sft\n  on_bad_row: drop"),
                    "data.train_on=all", "data.train.0.format=messages", "training.sync_ref_model=true",
                    "training.beta=0.2", "training.loss_type=[sigmoid, sft]")
    assert "preference.on_bad_row" in text and "did you mean preference.on_bad_rows?" in text
    assert "preference.reference (line 4): sft needs model.name_or_path to be a finished SFT run folder" in text
    assert "data.train_on (command line): DPO scores the responses only" in text
    assert "data.train.0.format (command line): messages is a format of sft data" in text
    assert "training.sync_ref_model (command line): not with a LoRA adapter" in text
    assert "beta" not in text and "loss_type" not in text  # DPOConfig's own keys are accepted
    assert "training.beta" in problems(write(tmp_path, f"model: {tiny_llama}"), "training.beta=high")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_dpo_recipe_is_valid_and_opens_with_its_command(path, sft_run):
    overrides = () if "quickstart" not in path.stem else (f"model.name_or_path={sft_run}",)
    recipe = load_recipe(path, overrides, command="dpo")
    assert path.read_text().splitlines()[0].startswith(f"# lorakit dpo recipes/dpo/{path.name}")
    header = read_header(path)
    assert header.about and header.hardware and header.peak_memory
    for source in recipe.data["train"] + (recipe.data["eval"] or []):
        assert Path(source["path"]).exists() or "/" in source["path"]


@pytest.mark.parametrize("path", [p for p in SHIPPED if "quickstart" not in p.stem],
                         ids=[p.stem for p in SHIPPED if "quickstart" not in p.stem])
def test_stated_peak_memory_is_what_validate_estimates(path):
    from lorakit.training.memory import estimate_recipe_memory, format_size

    recipe = load_recipe(path, command="dpo")
    config = model_config(recipe.model["name_or_path"])
    stated = re.findall(r"~(\d+\.\d) GiB", read_header(path).peak_memory)[0]
    assert f"{stated} GiB" == format_size(estimate_recipe_memory(recipe, config)[0].total)
