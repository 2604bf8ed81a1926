"""The classify recipes: each is valid offline, opens with its command and says what it needs; the quickstart's
data is what its committed script writes."""

from __future__ import annotations

import platform
import re
import subprocess
import sys

import pytest

from lorakit.commands.recipes import read_header, recipes_dir
from lorakit.recipe.load import load_recipe

CLASSIFY = sorted((recipes_dir() / "classify").glob("*.yaml"))


def test_there_are_recipes_for_decoders_encoders_and_every_task_type():
    recipes = [load_recipe(path, command="classify") for path in CLASSIFY]
    assert {r.sections["task"]["type"] for r in recipes} == {"classification", "multi_label", "regression"}
    assert any(r.quantization for r in recipes) and any(r.sections["task"]["head_only"] for r in recipes)
    assert any(r.sections["task"]["text_pair_column"] for r in recipes)
    assert any(r.lora.get("layers_to_transform") for r in recipes)


@pytest.mark.parametrize("path", CLASSIFY, ids=[p.stem for p in CLASSIFY])
def test_every_classify_recipe_is_valid_offline_and_opens_with_its_command(path):
    recipe = load_recipe(path, command="classify")
    assert recipe.lora["task_type"] == "SEQ_CLS"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert re.match(rf"^# lorakit classify recipes/classify/{re.escape(path.name)}$", first), first
    header = read_header(path)
    assert header.about and header.hardware and header.peak_memory, f"{path.name}: About, Hardware, Peak memory"


def test_the_quickstart_data_is_what_its_script_writes(tmp_path):
    if platform.python_version() != "3.11.7":
        pytest.skip(f"the committed rows come from CPython 3.11.7's standard library, not {platform.python_version()}")
    folder = recipes_dir() / "classify" / "docstrings"
    subprocess.run([sys.executable, str(folder / "make_data.py"), "--output-dir", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (folder / "data" / name).read_bytes(), name
    train = set((folder / "data" / "train.jsonl").read_text().splitlines())
    assert not train & set((folder / "data" / "test.jsonl").read_text().splitlines())  # nothing held out is trained


def test_validate_checks_a_classify_recipe_and_names_a_bad_row(tmp_path, tiny_llama):
    from click.testing import CliRunner

    from lorakit.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "the sky is blue", "label": "sky"}\n{"text": "fish live in water", "label": "water"}\n'
                    '{"text": "what do bees make", "label": 0.5}\n', encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"# lorakit classify recipe.yaml\nmodel: {tiny_llama}\ndata:\n  train: {data}\n"
                      f"training:\n  output_dir: {tmp_path / 'run'}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 1, result.output
    assert f"{data}: row 3: label 0.5 has a fraction" in result.output
    result = CliRunner().invoke(main, ["validate", str(recipe), "task.bad_labels=drop"])
    assert result.exit_code == 0, result.output
    assert "1 dropped for their label" in result.output and "train data: 2 rows" in result.output
    assert "the run can start: lorakit classify" in result.output
    # The memory a classify run needs, sized for the longest row it kept (RAM here: no GPU; --device cuda for one).
    result = CliRunner().invoke(main, ["validate", str(recipe), "task.bad_labels=drop", "--device", "cpu"])
    assert "memory (estimate)" in result.output and "peak on CPU RAM: LoRA, float32" in result.output
    assert "Python, libraries, data" in result.output and "total" in result.output


def test_the_task_keys_in_docs_classify_are_the_field_docs():
    from lorakit.recipe.reference import _table
    from lorakit.recipe.sections import TaskSection

    page = (recipes_dir().parent / "docs" / "classify.md").read_text(encoding="utf-8")
    assert "\n".join(_table(TaskSection, "task.")) in page, "regenerate the task table in docs/classify.md"
