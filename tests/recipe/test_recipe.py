"""Recipe validation: every problem at once, each as `section.key (line N): what is wrong`."""

from __future__ import annotations

import pytest
import yaml

from lorakit.recipe import RecipeError, load_recipe


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "hello"}\n')
    return path


def test_minimal_recipe_fills_documented_defaults(write_recipe, data_file, tmp_path):
    recipe = load_recipe(write_recipe(f"""\
        model: HuggingFaceTB/SmolLM2-135M
        data:
          train: {data_file}
        """))
    assert recipe.model["name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    assert recipe.lora["target_modules"] == "all-linear" and recipe.lora["r"] == 16
    assert recipe.training["lr_scheduler_type"] == "cosine" and recipe.training["learning_rate"] == 2e-4
    assert recipe.data["train_on"] == "completions" and recipe.data["max_length"] == 2048
    assert recipe.data["train"][0]["path"] == str(data_file)
    # Output goes to runs/<recipe name> in the working directory, made absolute so the dump re-runs anywhere.
    assert recipe.training["output_dir"].endswith("runs/recipe")


def test_unknown_keys_are_named_with_line_and_suggestion(write_recipe, data_file):
    path = write_recipe(f"""\
        model:
          name_or_path: owner/model
        lora:
          rank: 8
        training:
          learning_rat: 1.0e-4
        data:
          train: {data_file}
        """)
    assert problems(path) == [
        "lora.rank (line 4): unknown key; did you mean lora.r?",
        "training.learning_rat (line 6): unknown key; did you mean training.learning_rate?",
    ]


def test_every_problem_is_reported_at_once(write_recipe, tmp_path):
    path = write_recipe("""\
        model:
          name_or_path: ./no-such-model
          dtype: float8
        quantization:
          load_in_4bit: true
          load_in_8bit: true
        lora:
          r: -4
          lora_dropout: 1.5
        data:
          train:
            - path: missing.jsonl
          truncation: cut
        training:
          per_device_train_batch_size: many
          num_train_epochs: 0
        """)
    found = problems(path)
    # A missing path says where it was looked for: beside the recipe file.
    assert (f"model.name_or_path (line 2): no such folder: ./no-such-model (nor a Hub id of the form owner/name); "
            f"looked for {path.parent / 'no-such-model'}") in [p.split(" (a relative")[0] for p in found]
    assert "model.dtype (line 3): must be one of auto, bfloat16, float16, float32, not 'float8'; did you mean float32?" in found
    assert ("quantization.load_in_8bit (line 6): conflicts with quantization.load_in_4bit: choose one "
            "(4-bit NF4 for QLoRA, or 8-bit)") in found
    assert "lora.r (line 8): must be a positive integer (typical: 8-64)" in found
    assert "lora.lora_dropout (line 9): must be in [0, 1)" in found
    assert f"data.train.0.path (line 12): file not found: missing.jsonl; looked for {path.parent / 'missing.jsonl'}" \
        in [p.split(" (a relative")[0] for p in found]
    assert "data.truncation (line 13): must be one of truncate, drop, error, not 'cut'" in found
    assert "training.per_device_train_batch_size (line 15): must be an integer, not 'many'" in found
    assert "training.num_train_epochs (line 16): must be positive (or set training.max_steps)" in found
    assert len(found) == 9


def test_error_message_names_the_file(write_recipe):
    path = write_recipe("modle: x\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert "modle (line 1): unknown section; did you mean model?" in text
    assert "model: required: at least model.name_or_path" in text


def test_upstream_enum_values_are_checked_with_suggestions(write_recipe, data_file):
    path = write_recipe(f"""\
        model: owner/model
        data: {{train: {data_file}}}
        training:
          lr_scheduler_type: cosin
        """)
    (problem,) = problems(path)
    assert problem.startswith("training.lr_scheduler_type (line 4): must be one of linear, cosine")
    assert problem.endswith("not 'cosin'; did you mean cosine?")


def test_yaml_floats_written_without_a_dot_are_numbers(write_recipe, data_file):
    # YAML 1.1 reads 1e-4 as a string; a user means a number.
    recipe = load_recipe(write_recipe(f"""\
        model: owner/model
        data: {{train: {data_file}}}
        training: {{learning_rate: 1e-4}}
        """))
    assert recipe.training["learning_rate"] == pytest.approx(1e-4)


def test_overrides_are_typed_and_reported_as_command_line(write_recipe, data_file):
    path = write_recipe(f"""\
        model: owner/model
        data: {{train: {data_file}}}
        """)
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "lora.r=8", "data.max_length=512"])
    assert recipe.training["learning_rate"] == pytest.approx(1e-4)
    assert recipe.lora["r"] == 8 and recipe.data["max_length"] == 512
    assert problems(path, ["lora.r=eight"]) == ["lora.r (command line): must be an integer, not 'eight'"]
    assert problems(path, ["lora.alpha=4"]) == ["lora.alpha (command line): unknown key; did you mean lora.lora_alpha?"]


def test_keys_lorakit_sets_itself_point_to_the_right_key(write_recipe, data_file):
    path = write_recipe(f"""\
        model: owner/model
        data: {{train: {data_file}}}
        training:
          max_length: 512
        """)
    assert problems(path) == ["training.max_length (line 4): set by lorakit from data.max_length; set that instead"]


def test_conflicting_eval_settings_and_early_stopping_without_eval(write_recipe, data_file):
    path = write_recipe(f"""\
        model: owner/model
        data:
          train: {data_file}
          eval: {data_file}
          eval_fraction: 0.1
        """)
    assert problems(path) == [
        "data.eval_fraction (line 5): conflicts with data.eval: give eval sources or a fraction, not both"]
    path = write_recipe(f"""\
        model: owner/model
        data: {{train: {data_file}}}
        early_stopping: {{patience: 2}}
        """)
    assert problems(path) == ["early_stopping (line 3): needs evaluation data: set data.eval or data.eval_fraction"]


def test_invalid_yaml_is_one_clear_problem(write_recipe):
    path = write_recipe("model: [unclosed\n")
    (problem,) = problems(path)
    assert problem.startswith("recipe (line 2): not valid YAML")


def test_yaml_is_loaded_safely(write_recipe):
    path = write_recipe("model: !!python/object/apply:os.system ['echo unsafe']\n")
    (problem,) = problems(path)
    assert "not valid YAML" in problem


def test_missing_recipe_file(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"recipe: file not found: {tmp_path / 'nope.yaml'}"]


def test_quantization_defaults_to_nf4_double_quant(write_recipe, data_file):
    recipe = load_recipe(write_recipe(f"""\
        model: owner/model
        quantization: {{load_in_4bit: true}}
        data: {{train: {data_file}}}
        """))
    assert recipe.quantization == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                   "load_in_4bit": True}


def test_dump_is_rerunnable_and_has_no_secrets(write_recipe, data_file):
    recipe = load_recipe(write_recipe(f"""\
        model: owner/model
        data: {{train: {data_file}}}
        training: {{hub_token: hf_SECRETSECRET}}
        """))
    text = recipe.dump()
    assert "hf_SECRETSECRET" not in text
    reloaded = yaml.safe_load(text)
    assert reloaded["lora"] == recipe.lora and reloaded["data"]["train"] == recipe.data["train"]


def test_fingerprint_ignores_where_output_goes_but_not_what_trains(write_recipe, data_file):
    path = write_recipe(f"""\
        model: owner/model
        data: {{train: {data_file}}}
        """)
    base = load_recipe(path).fingerprint()
    assert load_recipe(path, ["training.output_dir=/tmp/elsewhere"]).fingerprint() == base
    assert load_recipe(path, ["lora.r=4"]).fingerprint() != base


def test_redaction_hides_credentials_but_keeps_special_token_settings():
    from lorakit.recipe import redact

    assert redact({"training": {"hub_token": "hf_x", "eos_token": "<|im_end|>", "pad_token": "<pad>"},
                   "stats": {"tokens": 5}, "api_key": "k", "password": None}) == {
        "training": {"hub_token": "<redacted>", "eos_token": "<|im_end|>", "pad_token": "<pad>"},
        "stats": {"tokens": 5}, "api_key": "<redacted>", "password": None}
