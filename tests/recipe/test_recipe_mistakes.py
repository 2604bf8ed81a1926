"""Recipe mistakes that used to slip through or crash after loading: each is an error at its line (or a warning),
found before anything is loaded, and none of them leaves an output folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import facts_rows, write_jsonl

from lorakit.cli import main
from lorakit.recipe import RecipeError, load_recipe


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", facts_rows("messages", repeat=1))


def recipe_text(model, data, out, training: str = "", lora: str = "") -> str:
    return (f"model:\n  name_or_path: {model}\nlora:\n  r: 4\n  lora_alpha: 8\n{lora}data:\n  train:\n"
            f"    - path: {data}\n  max_length: 64\ntraining:\n  output_dir: {out}\n  max_steps: 2\n"
            f"  per_device_train_batch_size: 4\n  save_strategy: 'no'\n{training}")


def test_negative_max_steps_other_than_minus_one_is_an_error_at_its_line(write_recipe, data_file):
    path = write_recipe(f"model: owner/model\ndata:\n  train: {data_file}\ntraining:\n  max_steps: -5\n")
    assert problems(path) == ["training.max_steps (line 5): must be at least 1, or -1 to train "
                              "training.num_train_epochs epochs instead; not -5"]
    assert problems(path, ["training.max_steps=0"])[0].startswith("training.max_steps (command line): must be")
    assert load_recipe(path, ["training.max_steps=-1"]).training["max_steps"] == -1  # -1 still means "no limit"


@pytest.mark.parametrize("key, value", [
    ("training.learning_rate", ".nan"), ("training.learning_rate", ".inf"), ("training.weight_decay", "-.inf"),
    ("lora.lora_dropout", ".nan"), ("data.eval_fraction", ".nan"), ("training.max_grad_norm", ".inf"),
])
def test_non_finite_numbers_are_refused_in_every_numeric_key(write_recipe, data_file, key, value):
    section, name = key.split(".")
    text = f"model: owner/model\ndata:\n  train: {data_file}\n"
    text += f"  {name}: {value}\n" if section == "data" else f"{section}:\n  {name}: {value}\n"
    path = write_recipe(text)
    shown = "nan" if "nan" in value else "inf"
    [problem] = problems(path)
    assert problem.startswith(f"{key} (line ") and "must be a finite number" in problem and shown in problem
    # the same on the command line
    clean = write_recipe(f"model: owner/model\ndata:\n  train: {data_file}\n", name="clean.yaml")
    [problem] = problems(clean, [f"{key}={value}"])
    assert problem.startswith(f"{key} (command line): must be a finite number")


def test_a_duplicated_key_is_an_error_at_both_lines(write_recipe, data_file):
    path = write_recipe(f"""\
        model:
          name_or_path: owner/model
        lora:
          r: 4
          lora_alpha: 8
          r: 64
        data:
          train:
            - path: {data_file}
              format: messages
              format: text
        training:
          learning_rat: 1.0e-4
        """)
    assert problems(path) == [
        "lora.r (line 4): written twice, at lines 4 and 6; YAML would silently keep the second: keep only the one "
        "you mean",
        "data.train.0.format (line 10): written twice, at lines 10 and 11; YAML would silently keep the second: "
        "keep only the one you mean",
        "training.learning_rat (line 13): unknown key; did you mean training.learning_rate?",  # all at once
    ]


def test_eval_strategy_without_eval_data_names_both_keys(write_recipe, data_file):
    path = write_recipe(f"model: owner/model\ndata:\n  train: {data_file}\ntraining:\n  eval_strategy: steps\n")
    assert problems(path) == ["training.eval_strategy (line 5): steps evaluates during training, but the recipe has "
                              "no evaluation data: set data.eval (or data.eval_fraction), or remove "
                              "training.eval_strategy"]
    assert load_recipe(path, ["data.eval_fraction=0.25"]).training["eval_strategy"] == "steps"


def test_a_learning_rate_outside_the_usual_lora_range_is_a_warning_at_its_line(tiny_llama, data_file, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_llama, data_file, tmp_path / "out", "  learning_rate: 1.0e+8\n"))
    recipe = load_recipe(path)  # allowed: a warning, not an error
    [warning] = [str(w) for w in recipe.warnings]
    assert warning.startswith("training.learning_rate (line 15): 1e+08 is outside 1e-05 to 0.01")
    assert not load_recipe(path, ["training.learning_rate=2e-4"]).warnings

    result = CliRunner().invoke(main, ["validate", str(path), "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert "warning  recipe: training.learning_rate (line 15): 1e+08 is outside" in result.output


def test_target_modules_that_match_nothing_are_exit_2_at_their_line_listing_the_layers(tiny_llama, data_file,
                                                                                       tmp_path):
    out = tmp_path / "runs" / "out"
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_llama, data_file, out, lora="  target_modules: [foo_proj, bar_proj]\n"))
    for command in ("sft", "validate"):
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert (f"lora.target_modules (line 6): [foo_proj, bar_proj] matches no layer of {tiny_llama}; its linear "
                "layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head") in result.output
        assert "Traceback" not in result.output and "NoMatchingPeftModuleError" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case, training, lora", [
    ("negsteps", "  max_steps: -5\n", ""),
    ("lrnan", "  learning_rate: .nan\n", ""),
    ("dupkey", "", "  r: 64\n"),
    ("evalnodata", "  eval_strategy: steps\n", ""),
    ("nomatch", "", "  target_modules: [foo_proj]\n"),
])
def test_no_mistaken_recipe_creates_an_output_folder(tiny_llama, data_file, tmp_path, monkeypatch, case, training,
                                                     lora):
    from lorakit.models import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for a recipe that is mistaken")

    monkeypatch.setattr(loading, "load_model", no_loading)
    out = tmp_path / "runs" / case
    text = recipe_text(tiny_llama, data_file, out, training, lora)
    if case == "negsteps":
        text = text.replace("  max_steps: 2\n", "")  # only the mistaken value
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["sft", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_a_data_file_that_is_not_utf8_is_named_by_line_with_how_to_convert_it(tiny_llama, tmp_path):
    rows = facts_rows("messages", repeat=1)
    rows[2]["messages"][2]["content"] = "Café au lait."
    data = tmp_path / "latin1.jsonl"
    import json

    data.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("latin-1"))
    out = tmp_path / "runs" / "latin1"
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_llama, data, out))
    result = CliRunner().invoke(main, ["sft", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{data}: line 3 is not UTF-8 (byte 0xe9" in result.output and "Café au lait" in result.output
    assert f"iconv -f cp1252 -t utf-8 {data} > {tmp_path / 'latin1.utf8.jsonl'}" in result.output
    assert not (tmp_path / "runs").exists()  # found after the folder was locked: the lock left nothing behind


def test_yaml_1_1_no_is_the_word_no_where_a_choice_spells_it(write_recipe, data_file):
    # YAML 1.1 reads an unquoted `no` as false; `eval_strategy: no` means the choice "no", not a type error.
    path = write_recipe(f"model: owner/model\ndata:\n  train: {data_file}\ntraining:\n  save_strategy: no\n")
    recipe = load_recipe(path, ["training.eval_strategy=no"])
    assert recipe.training["eval_strategy"] == "no" and recipe.training["save_strategy"] == "no"
    assert "did you mean no?" in problems(path, ["training.eval_strategy=nope"])[0]
