"""Relative paths in a recipe mean the same from any working directory: they are relative to the recipe file's
folder. Copies made by `lorakit init` run anywhere; a missing path says where it was looked for; report_to is
checked before anything loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import facts_rows, write_jsonl
from lorakit.cli import main
from lorakit.errors import RecipeError
from lorakit.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def test_the_shipped_quickstart_loads_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(QUICKSTART)
    assert recipe.model["name_or_path"] == str(REPO / "recipes" / "quickstart" / "base_model")
    assert recipe.data["train"][0]["path"] == str(REPO / "recipes" / "quickstart" / "data" / "train.jsonl")
    assert recipe.data["eval"][0]["path"] == str(REPO / "recipes" / "quickstart" / "data" / "test.jsonl")
    # The output folder is where the command runs, like any output a shell command writes.
    assert recipe.output_dir == tmp_path / "runs" / "quickstart"


def test_a_copied_recipe_validates_from_another_folder(tmp_path, monkeypatch):
    copies, elsewhere = tmp_path / "copies", tmp_path / "elsewhere"
    copies.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(copies)
    written = CliRunner().invoke(main, ["init", "quickstart", "qs.yaml"])
    assert written.exit_code == 0, written.output
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(main, ["validate", str(copies / "qs.yaml"), "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert "the run can start" in result.output


def test_a_relative_path_is_looked_for_beside_the_recipe_not_in_the_working_directory(tmp_path, monkeypatch,
                                                                                        tiny_llama):
    project, work = tmp_path / "project", tmp_path / "work"
    project.mkdir(), work.mkdir()
    write_jsonl(work / "train.jsonl", facts_rows("messages"))  # in the working directory only
    recipe = project / "recipe.yaml"
    recipe.write_text(f"model: {tiny_llama}\ndata:\n  train:\n    - path: ./train.jsonl\n")
    monkeypatch.chdir(work)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert f"data.train.0.path (line 4): file not found: ./train.jsonl; looked for {project / 'train.jsonl'}" \
        in str(info.value)
    assert "relative to the recipe file's folder" in str(info.value)

    # Beside the recipe it is found, whatever the working directory; a path typed on the command line is the
    # shell's, relative to the working directory.
    write_jsonl(project / "train.jsonl", facts_rows("messages"))
    assert load_recipe(recipe).data["train"][0]["path"] == str(project / "train.jsonl")
    (work / "other.jsonl").write_text((project / "train.jsonl").read_text())
    overridden = load_recipe(recipe, ["data.train.0.path=other.jsonl"])
    assert overridden.data["train"][0]["path"] == str(work / "other.jsonl")


def test_report_to_without_its_package_is_a_recipe_error_with_the_install_line(tmp_path, tiny_llama, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_llama}\ndata:\n  train: {data}\ntraining:\n  report_to: [tensorboard, wandbb]\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert ("training.report_to (line 5): tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard") in result.output
    assert "'wandbb' is not a logging integration of transformers" in result.output
    assert "did you mean wandb?" in result.output
    assert "Traceback" not in result.output
