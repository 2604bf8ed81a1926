"""The recipe library: every shipped recipe is valid offline and tells the truth in its header; list and copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hub_model_shapes import MODEL_CONFIGS, model_config

from lorakit.cli import main
from lorakit.commands.recipes import read_header, recipes_dir
from lorakit.recipe import load_recipe

SHIPPED = sorted(recipes_dir().glob("*.yaml"))
# A second figure in a header's Peak memory line, and how it is estimated: (device, overrides).
SECOND_FIGURE = {
    "smollm2-135m-alpaca": ("cpu", ()),
    "smollm2-360m-alpaca": ("cpu", ()),
    "llama-3.1-70b-qlora-fsdp": ("cuda", ("launch.num_processes=2",)),
}


def model_name(path: Path) -> str:
    model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model")
    return model.get("name_or_path", "") if isinstance(model, dict) else str(model)


REAL_MODEL_RECIPES = [p for p in SHIPPED if model_name(p) in MODEL_CONFIGS]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_library_covers_the_models_users_fine_tune():
    models = {model_name(p) for p in SHIPPED + sorted((recipes_dir() / "dpo").glob("*.yaml"))}
    assert set(MODEL_CONFIGS) <= models  # every shape in the table belongs to a shipped recipe
    assert len(REAL_MODEL_RECIPES) >= 9


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_is_valid_offline_and_opens_with_its_command(path):
    recipe = load_recipe(path)  # keys and types against lorakit's sections, LoraConfig, SFTConfig, BitsAndBytesConfig
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert re.match(rf"^# lorakit sft recipes/{re.escape(path.name)}\b", first_line), first_line
    header = read_header(path)
    assert header.about and header.hardware and header.peak_memory, f"{path.name}: About, Hardware, Peak memory"
    for source in recipe.data["train"] + (recipe.data["eval"] or []):
        if not Path(source["path"]).exists():  # a Hub data set: its format cannot be detected without a download
            assert source["format"], f"{path.name}: {source['path']} needs format:"


@pytest.mark.parametrize("path", REAL_MODEL_RECIPES, ids=[p.stem for p in REAL_MODEL_RECIPES])
def test_stated_peak_memory_is_what_validate_estimates(path):
    from lorakit.training.memory import estimate_recipe_memory
    from lorakit.training.memory import format_size

    recipe = load_recipe(path)
    config = model_config(recipe.model["name_or_path"])
    figures = re.findall(r"~(\d+\.\d) GiB", read_header(path).peak_memory)
    estimate, _ = estimate_recipe_memory(recipe, config, "cuda")
    assert f"{figures[0]} GiB" == format_size(estimate.total)
    if path.stem in SECOND_FIGURE:
        device, overrides = SECOND_FIGURE[path.stem]
        estimate, _ = estimate_recipe_memory(load_recipe(path, overrides), config, device)
        assert f"{figures[1]} GiB" == format_size(estimate.total)


def test_recipes_lists_each_one_on_one_line():
    result = run_cli("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for path in SHIPPED:
        matching = [line for line in lines if line.startswith(path.stem + " ")]
        assert len(matching) == 1, path.stem
        about = read_header(path).about
        assert about.split(" (")[0] in matching[0]


def test_recipes_says_where_the_library_is_missing(tmp_path, monkeypatch):
    import lorakit

    monkeypatch.setattr(lorakit, "__file__", str(tmp_path / "site-packages" / "lorakit" / "__init__.py"))
    result = run_cli("recipes")
    assert result.exit_code == 2
    assert "no recipe library at" in result.output and "pip install -e ." in result.output


def test_init_copies_a_recipe_that_still_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("init", "llama-3.1-8b-qlora-24gb")
    assert result.exit_code == 0, result.output
    copy = tmp_path / "llama-3.1-8b-qlora-24gb.yaml"
    shipped = recipes_dir() / copy.name
    assert copy.read_text().splitlines()[1:] == shipped.read_text().splitlines()[1:]
    assert copy.read_text().splitlines()[0] == f"# lorakit sft {copy.name}"
    assert load_recipe(copy).to_dict() == load_recipe(shipped).to_dict()


def test_init_makes_paths_next_to_the_recipe_absolute(tmp_path):
    (tmp_path / "mine").mkdir()
    result = run_cli("init", "llama-3.1-70b-qlora-fsdp.yaml", tmp_path / "mine")
    assert result.exit_code == 0, result.output
    copy = load_recipe(tmp_path / "mine" / "llama-3.1-70b-qlora-fsdp.yaml")
    assert copy.launch["accelerate_config"] == str(recipes_dir() / "accelerate" / "fsdp2-qlora.yaml")


def test_init_never_overwrites_and_suggests_names(tmp_path):
    dest = tmp_path / "recipe.yaml"
    dest.write_text("mine\n")
    result = run_cli("init", "mistral-7b-qlora", dest)
    assert result.exit_code == 2
    assert f"{dest} already exists; nothing was written" in result.output
    assert dest.read_text() == "mine\n"
    result = run_cli("init", "mistral-7b-qlor", tmp_path / "new.yaml")
    assert result.exit_code == 2 and "did you mean mistral-7b-qlora?" in result.output
    assert not (tmp_path / "new.yaml").exists()


def test_classify_and_dpo_recipes_are_listed_and_copied_by_folder_and_name(tmp_path):
    result = run_cli("recipes")
    assert result.exit_code == 0, result.output
    for name in ("classify/quickstart", "dpo/quickstart-dpo", "dpo/llama-3.1-8b-qlora-dpo"):
        assert sum(line.startswith(name + " ") for line in result.output.splitlines()) == 1, name
    result = run_cli("init", "classify/quickstart", tmp_path)
    assert result.exit_code == 0, result.output
    assert f"lorakit classify {tmp_path / 'quickstart.yaml'}" in result.output
    copy = load_recipe(tmp_path / "quickstart.yaml", command="classify")
    assert copy.to_dict() == load_recipe(recipes_dir() / "classify" / "quickstart.yaml", command="classify").to_dict()
    result = run_cli("init", "dpo/quickstart-dp", tmp_path / "new.yaml")
    assert result.exit_code == 2 and "did you mean dpo/quickstart-dpo?" in result.output
