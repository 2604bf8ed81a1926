"""The sweep: section and its space, checked before any training: problems by key and line, every recipe the
space can produce validated like a normal recipe, tied values, and `lorakit sft` / `lorakit validate` on a
recipe with a sweep section."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sweep_recipes import line_of, write_sweep_recipe

from lorakit.cli import main
from lorakit.errors import RecipeError
from lorakit.recipe.load import load_recipe
from lorakit.sweep import expressions
from lorakit.sweep.recipes import candidate_points, load_sweep_recipe

GOOD = """\
n_trials: 3
parameters:
  training.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  lora.r: {type: categorical, choices: [2, 4, 8]}
  lora.lora_alpha: {expr: "2 * lora.r"}
"""


def problems_of(recipe, *overrides) -> list[str]:
    with pytest.raises(RecipeError) as error:
        load_sweep_recipe(recipe, overrides)
    return [str(problem) for problem in error.value.problems]


def test_every_problem_of_the_section_is_named_by_key_and_line(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, """\
        objective: {metric: eval_f1}
        sampler: bayes
        pruner: {name: median, n_startup: 2}
        parameters:
          training.learning_rate: {type: float, low: 1.0e-2, high: 1.0e-4}
          training.weight_decay: {type: float, low: 0.0, high: 0.1, log: true}
          lora.r: {type: categorical, choices: []}
          lora.lora_dropout: {type: floats, low: 0.0, high: 0.2}
          lora.lora_alpha: {expr: "2 * lora.rank"}
          training.max_steps: {type: int, low: 2, high: 9, step: 2}
          training.output_dir: {type: categorical, choices: [a, b]}
        """)
    found = problems_of(recipe)
    expected = [
        ("sweep.objective.direction", "objective:", "required for eval_f1: maximize or minimize"),
        ("sweep.sampler", "sampler:", "must be one of tpe, random, grid, not 'bayes'"),
        ("sweep.pruner.n_startup", "pruner:", "unknown option of median; did you mean n_startup_trials?"),
        ("sweep.parameters.training.learning_rate.low", "training.learning_rate:", "low (0.01) is above high (0.0001)"),
        ("sweep.parameters.training.weight_decay.low", "training.weight_decay:", "must be above 0 with log: true"),
        ("sweep.parameters.lora.r.choices", "lora.r:", "required: a non-empty list of values"),
        ("sweep.parameters.lora.lora_dropout.type", "lora.lora_dropout:", "did you mean float?"),
        ("sweep.parameters.lora.lora_alpha.expr", "lora.lora_alpha:", "reads lora.rank, which is neither searched"),
        ("sweep.parameters.training.max_steps.step", "training.max_steps:", "high (9) is not low (2) plus a whole"),
        ("sweep.parameters.training.output_dir", "training.output_dir:", "cannot be searched: each trial runs in"),
        ("sweep.n_trials", "sweep:", "required: how many trials to run"),
    ]
    for path, line_text, message in expected:
        line = line_of(recipe, line_text)
        assert any(p.startswith(f"{path} (line {line}): ") and message in p for p in found), (path, line, found)
    assert len(found) == len(expected), found


def test_values_the_space_can_produce_are_refused_before_any_training(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, """\
        n_trials: 4
        parameters:
          lora.lora_dropout: {type: float, low: 0.0, high: 1.0}
          training.warmup_steps: {type: int, low: -2, high: 3}
          training.learnig_rate: {type: float, low: 1.0e-4, high: 1.0e-3}
        """)
    result = CliRunner().invoke(main, ["sweep", str(recipe)])
    assert result.exit_code == 2, result.output
    dropout, warmup, typo = (line_of(recipe, key) for key in ("lora.lora_dropout:", "training.warmup_steps:",
                                                               "training.learnig_rate:"))
    assert f"sweep.parameters.lora.lora_dropout (line {dropout}): must be in [0, 1) (the sweep can set it to 1.0)" \
        in result.output
    assert f"sweep.parameters.training.warmup_steps (line {warmup}): must be >= 0" in result.output
    assert "(the sweep can set it to -2)" in result.output
    assert f"sweep.parameters.training.learnig_rate (line {typo}): unknown key; did you mean " \
           "training.learning_rate?" in result.output
    assert not (tmp_path / "sweep").exists()  # nothing was started, not even the study


def test_every_grid_point_is_checked_and_a_bad_combination_named(tiny_llama, tmp_path):
    # Only lora.r = 8 makes the tied alpha 0: a grid checks each of its points, ends or not.
    recipe = write_sweep_recipe(tmp_path, tiny_llama, """\
        sampler: grid
        parameters:
          lora.r: {type: categorical, choices: [4, 8, 16]}
          training.learning_rate: {type: float, low: 1.0e-3, high: 3.0e-3, step: 1.0e-3}
          lora.lora_alpha: {expr: "(lora.r - 8) ** 2"}
        """)
    found = problems_of(recipe)
    line = line_of(recipe, "lora.lora_alpha:")
    assert found == [f"sweep.parameters.lora.lora_alpha (line {line}): must be positive (typical: 2 x r) "
                     "(the sweep can set it to 0)"]
    recipe.write_text(recipe.read_text().replace("(lora.r - 8) ** 2", "2 * lora.r"))
    sweep = load_sweep_recipe(recipe).sweep
    assert sweep.n_trials == 9  # the whole grid by default
    assert len(candidate_points(sweep)) == 9


def test_a_command_line_override_cannot_also_set_a_searched_key(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, GOOD)
    assert problems_of(recipe, "lora.r=16") == ["lora.r (command line): is searched by sweep.parameters; set it "
                                                "there or here, not both"]
    assert load_sweep_recipe(recipe, ["sweep.n_trials=7"]).sweep.n_trials == 7


def test_the_objective_needs_the_evaluations_it_names(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, GOOD)
    recipe.write_text(recipe.read_text().replace("  eval_fraction: 0.25\n", "").replace("  eval_steps: 2\n", ""))
    assert problems_of(recipe) == [f"sweep.objective.metric (line {line_of(recipe, 'sweep:')}): eval_loss needs "
                                   "evaluation data: set data.eval or data.eval_fraction, or optimise a training "
                                   "metric such as train_loss"]
    sweep = load_sweep_recipe(recipe, ["sweep.objective=train_loss"]).sweep
    assert (sweep.metric, sweep.direction, sweep.pruner) == ("train_loss", "minimize", "none")


def test_tied_values_follow_what_they_read(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, GOOD + '  lora.lora_dropout: {expr: "0.01 * lora.lora_alpha"}\n')
    loaded = load_sweep_recipe(recipe)
    values = loaded.values_for({"training.learning_rate": 1e-3, "lora.r": 8})
    assert values == {"training.learning_rate": 1e-3, "lora.r": 8, "lora.lora_alpha": 16, "lora.lora_dropout": 0.16}
    trial = loaded.trial_recipe(values, "trial-5")
    assert (trial.lora["r"], trial.lora["lora_alpha"], trial.training["learning_rate"]) == (8, 16, 1e-3)
    assert trial.output_dir == tmp_path / "sweep" / "trial-5"


def test_expressions_are_arithmetic_only():
    assert expressions.evaluate("2 * lora.r", {"lora.r": 8}) == 16
    assert expressions.evaluate("max(1, lora.r // 4) + 0.5", {"lora.r": 2}) == 1.5
    assert expressions.names("lora.r * training.max_steps + lora.r") == ["lora.r", "training.max_steps"]
    for text in ("__import__('os').system('true')", "lora.r.__class__", "'a' * 3", "[1, 2]", "lora.r if 1 else 2",
                 "open('x')"):
        with pytest.raises(expressions.ExpressionError):
            expressions.evaluate(text, {"lora.r": 8})
    with pytest.raises(expressions.ExpressionError, match="divides by zero with lora.r=0"):
        expressions.evaluate("16 / lora.r", {"lora.r": 0})


def test_lorakit_sft_on_a_recipe_with_a_sweep_section_says_to_run_sweep(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, GOOD)
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert [str(p) for p in error.value.problems] == [
        f"sweep (line {line_of(recipe, 'sweep:')}): is read by `lorakit sweep`, which trains this recipe once per "
        "trial with the values it searches; run `lorakit sweep` on this file, or remove the section to train it "
        "once as written"]


def test_lorakit_validate_checks_the_sweep_section(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, GOOD.replace("choices: [2, 4, 8]", "choices: [2, 0]"))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert f"sweep.parameters.lora.r (line {line_of(recipe, 'lora.r:')}): must be a positive integer" in result.output
    recipe = write_sweep_recipe(tmp_path, tiny_llama, GOOD)
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "sweep: 3 trials of lorakit sft, minimize eval_loss" in result.output
    assert "training.learning_rate=0.01, lora.r=8" in result.output  # data and memory checked at the largest
    assert f"the run can start: lorakit sweep {recipe}" in result.output
