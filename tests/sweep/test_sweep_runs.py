"""`lorakit sweep` end to end on a tiny model on CPU: the best trial and its recipe, the table, CSV and plots,
pruning of hopeless trials, and diverging or out-of-memory trials recorded as failed while the sweep goes on."""

from __future__ import annotations

import csv
import re

import optuna
import pytest
from click.testing import CliRunner
from sweep_recipes import write_sweep_recipe

from lorakit.cli import main
from lorakit.recipe.load import load_recipe
from lorakit.sweep import study as studies
from lorakit.training import run_dir


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def load_study(folder):
    return optuna.load_study(study_name=folder.name, storage=studies.open_storage(None, folder))


def read_results(folder) -> list[dict]:
    with (folder / "sweep_results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_sweep_finds_its_best_trial_and_writes_its_recipe_table_and_plots(tiny_llama, tmp_path):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, """\
        n_trials: 4
        sampler: {name: tpe, seed: 0, n_startup_trials: 2}
        pruner: none
        parameters:
          training.learning_rate: {type: float, low: 1.0e-4, high: 2.0e-2, log: true}
          lora.r: {type: categorical, choices: [2, 8]}
          lora.lora_alpha: {expr: "2 * lora.r"}
        """)
    result = CliRunner().invoke(main, ["sweep", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "sweep"
    for n in range(1, 5):
        assert f"lorakit sweep: trial {n} of 4 (#{n - 1})" in result.output
    assert "best so far: eval_loss" in result.output

    rows = read_results(folder)
    assert [row["state"] for row in rows] == ["complete"] * 4
    study = load_study(folder)
    best = min(rows, key=lambda row: float(row["eval_loss"]))
    assert float(best["eval_loss"]) == study.best_value
    assert int(best["trial"]) == study.best_trial.number
    for row in rows:  # each trial is a real lorakit run, its objective the run's own final eval loss
        record = run_dir.read_record(folder / row["folder"])
        assert record["status"] == run_dir.COMPLETED
        assert record["metrics"]["eval_loss"] == float(row["eval_loss"])
        assert float(row["lora.lora_alpha"]) == 2 * float(row["lora.r"])
    assert f"* best: trial {best['trial']}, eval_loss" in result.output

    resolved = load_recipe(folder / "best.yaml")  # ready for `lorakit sft best.yaml`
    assert (folder / "best.yaml").read_text().startswith("# lorakit sft best.yaml\n")
    assert resolved.training["learning_rate"] == study.best_params["training.learning_rate"]
    assert resolved.lora["r"] == study.best_params["lora.r"] and resolved.lora["lora_alpha"] == 2 * resolved.lora["r"]
    assert resolved.output_dir == folder / "best"
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot

    before = {row["folder"]: (folder / row["folder"] / run_dir.RECORD_FILE).read_text() for row in rows}
    again = CliRunner().invoke(main, ["sweep", str(recipe)], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "lorakit sweep: trial" not in again.output  # the finished study runs nothing more
    assert f"* best: trial {best['trial']}" in again.output
    assert before == {name: (folder / name / run_dir.RECORD_FILE).read_text() for name in before}


@pytest.mark.slow
def test_pruning_stops_a_hopeless_trial_and_failed_trials_leave_the_sweep_going(tiny_llama, tmp_path, monkeypatch):
    import torch
    from trl import SFTTrainer

    training_step = SFTTrainer.training_step

    def out_of_memory_at_3e_3(self, model, inputs, *args, **kwargs):  # as a GPU too small for this trial would
        if self.args.learning_rate == 3e-3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", out_of_memory_at_3e_3)
    # Optuna's grid visits its points in a fixed shuffled order: this list makes it 5e-3 (learns), 1e38 (diverges),
    # 1e-8 (learns nothing: pruned at its first evaluation against the first trial), 3e-3 (out of memory).
    recipe = write_sweep_recipe(tmp_path, tiny_llama, """\
        sampler: grid
        pruner: {name: median, n_startup_trials: 1}
        parameters:
          training.learning_rate: {type: categorical, choices: [3.0e-3, 1.0e-8, 5.0e-3, 1.0e38]}
        """, training="max_grad_norm: 0\n")
    result = CliRunner().invoke(main, ["sweep", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    in_order = read_results(tmp_path / "sweep")
    assert [float(row["training.learning_rate"]) for row in in_order] == [5e-3, 1e38, 1e-8, 3e-3], \
        "the test relies on Optuna's grid order: the learning trial first"
    rows = {float(row["training.learning_rate"]): row for row in in_order}
    assert rows[5e-3]["state"] == "complete"
    assert rows[1e38]["state"] == "failed: diverged"
    assert re.match(r"training diverged at step \d", rows[1e38]["note"])
    assert rows[3e-3]["state"] == "failed: out of memory"
    assert rows[3e-3]["note"].startswith("out of memory at step 1")
    assert rows[1e-8]["state"] == "pruned at step 2"
    pruned = run_dir.read_record(tmp_path / "sweep" / rows[1e-8]["folder"])
    assert pruned["status"] == run_dir.FAILED and pruned["failure"]["message"].startswith("pruned at step 2 of 4")
    assert pruned["planned_steps"] == 4 and max(e["step"] for e in pruned["log_history"]) == 2  # stopped early
    assert load_study(tmp_path / "sweep").best_params == {"training.learning_rate": 5e-3}
