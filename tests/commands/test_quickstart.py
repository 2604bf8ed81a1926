"""The quickstart: the embedded base model cannot do the task; a short LoRA run through the real recipe can."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorakit.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def test_embedded_base_model_is_a_real_language_model():
    report = json.loads((REPO / "recipes" / "quickstart" / "base_model" / "pretraining_report.json").read_text())
    assert report["heldout_perplexity"]["all"] < report["unigram_perplexity"]["all"] / 5
    assert (REPO / "recipes" / "quickstart" / "base_model" / "model.safetensors").stat().st_size < 20 * 2**20


def test_test_split_never_repeats_a_training_sentence():
    def users(split):
        rows = (REPO / "recipes" / "quickstart" / "data" / f"{split}.jsonl").read_text().splitlines()
        return {json.loads(row)["messages"][1]["content"] for row in rows}

    train, test = users("train"), users("test")
    assert len(train) == 2000 and len(test) == 200 and not train & test


@pytest.mark.slow
def test_quickstart_recipe_raises_the_held_out_score(tmp_path):
    test_rows = (REPO / "recipes" / "quickstart" / "data" / "test.jsonl").read_text().splitlines()[:60]
    held_out = tmp_path / "test.jsonl"
    held_out.write_text("\n".join(test_rows) + "\n")
    out = tmp_path / "quickstart"
    runner = CliRunner()
    trained = runner.invoke(main, ["sft", str(QUICKSTART), "training.max_steps=250", "--output-dir", str(out)],
                            catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    report = tmp_path / "report.json"
    scored = runner.invoke(main, ["eval", str(out), "--data", str(held_out), "--compare-base",
                                  "--output", str(report)], catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
    metrics = json.loads(report.read_text())["metrics"]
    print(metrics)
    model_em, base_em = metrics["model"]["exact_match"], metrics["base"]["exact_match"]
    assert base_em == 0.0
    assert model_em >= 0.5 and model_em > base_em
    assert metrics["model"]["token_f1"] > metrics["base"]["token_f1"] + 0.5
