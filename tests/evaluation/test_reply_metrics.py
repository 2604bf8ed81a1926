"""Reply metrics for free-text tasks: ROUGE-L (rouge-score), chrF and BLEU (sacrebleu), chosen by --metrics or the
recipe's evaluation.metrics, beside the base model; and how many replies ran into --max-new-tokens."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from conftest import FACTS, facts_rows, write_adapter_run, write_jsonl
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.evaluation.metrics import check_reply_metrics, score_replies

pytest.importorskip("rouge_score", reason="rouge-score is in the test extras: pip install -e '.[test]'")
pytest.importorskip("sacrebleu", reason="sacrebleu is in the test extras: pip install -e '.[test]'")


def test_rouge_l_chrf_and_bleu_on_replies_worked_out_by_hand():
    overall, per_reply = score_replies(["the cat sat", "the sky is blue today", "zzz"],
                                       ["the cat sat down", "the sky is blue today", "qqq"],
                                       ["rouge_l", "chrf", "bleu", "exact_match"])
    # Longest common word sequence "the cat sat": precision 3/3, recall 3/4, F = 2 * 1 * 0.75 / 1.75.
    assert per_reply["rouge_l"] == pytest.approx([6 / 7, 1.0, 0.0])
    assert overall["rouge_l"] == pytest.approx((6 / 7 + 1) / 3)
    assert per_reply["chrf"][1] == pytest.approx(100.0) and per_reply["chrf"][2] == pytest.approx(0.0)
    assert per_reply["bleu"][1] == pytest.approx(100.0) and per_reply["bleu"][2] == pytest.approx(0.0)
    assert 0 < overall["chrf"] < 100 and 0 < overall["bleu"] < 100  # corpus scores, not a mean of sentences
    assert per_reply["exact_match"] == [0.0, 1.0, 0.0]


def test_an_unknown_metric_or_a_missing_package_is_told_before_loading(monkeypatch):
    with pytest.raises(LorakitError, match="unknown metric 'rogue_l'; choose from exact_match, token_f1, rouge_l"):
        check_reply_metrics(["rogue_l"], "--metrics")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    with pytest.raises(LorakitError, match=r"chrf needs the sacrebleu package, which is not installed: "
                                           r"pip install sacrebleu"):
        check_reply_metrics(["chrf"], "--metrics")


@pytest.mark.slow
def test_eval_reports_the_chosen_metrics_beside_the_base_and_the_cut_replies(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages", repeat=1))
    run = write_adapter_run(tmp_path / "run", tiny_llama, data)
    report_file = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["eval", str(run), "--data", str(data), "--metrics", "rouge_l,chrf",
                                       "--compare-base", "--max-new-tokens", "3", "--output", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    for name in ("model", "base"):
        figures = report["metrics"][name]
        assert set(figures) >= {"loss", "rouge_l", "chrf"} and "exact_match" not in figures
        per_reply = [example[f"{name}_rouge_l"] for example in report["examples"]]
        assert figures["rouge_l"] == pytest.approx(sum(per_reply) / len(per_reply))
    assert "ROUGE-L" in result.output and "chrF" in result.output and "exact match" not in result.output
    # A random adapter's replies run on: every one is cut at 3 tokens, and the report says so.
    cut = report["metrics"]["model"]["replies_cut_at_max_new_tokens"]
    assert cut == len(FACTS)
    assert f"{cut} of {len(FACTS)} model replies reached --max-new-tokens 3 and were cut" in result.output

    # The recipe's evaluation.metrics is the default.
    recipe = run / "lorakit_recipe.yaml"
    recipe.write_text(recipe.read_text() + "evaluation:\n  metrics: [bleu]\n")
    result = CliRunner().invoke(main, ["eval", str(run), "--data", str(data), "--max-new-tokens", "3",
                                       "--output", str(report_file)])
    assert result.exit_code == 0, result.output
    assert set(json.loads(report_file.read_text())["settings"]["metrics"]) == {"bleu"}
    assert "BLEU" in result.output
