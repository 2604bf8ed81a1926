"""The quickstart DPO pairs: built from the quickstart's own task data by the committed script, the right record
chosen over a wrong one, held-out pairs only from held-out sentences; and `lorakit validate` passes the recipe."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import write_adapter_run

from lorakit.cli import main

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "recipes" / "dpo" / "quickstart-pairs"
DATA = REPO / "recipes" / "quickstart" / "data"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_each_pair_is_a_quickstart_row_with_its_record_chosen_over_a_wrong_one():
    for split in ("train", "test"):
        rows, pairs = read(DATA / f"{split}.jsonl"), read(PAIRS / f"{split}.jsonl")
        assert len(pairs) == len(rows)
        for row, pair in zip(rows, pairs):
            assert pair["chosen"] == row["messages"]
            assert pair["rejected"][:2] == row["messages"][:2]  # the same system and user turns: the prompt
            assert pair["rejected"][2]["role"] == "assistant"
            assert pair["rejected"][2]["content"] != row["messages"][2]["content"]
    train_sentences = {pair["chosen"][1]["content"] for pair in read(PAIRS / "train.jsonl")}
    assert not train_sentences & {pair["chosen"][1]["content"] for pair in read(PAIRS / "test.jsonl")}


def test_made_up_mistakes_change_exactly_one_field():
    sys.path.insert(0, str(REPO / "recipes" / "dpo"))
    import make_quickstart_pairs as script

    rows = read(DATA / "test.jsonl")[:50]
    for pair in script.make_pairs(rows, random.Random(0)):
        right = pair["chosen"][2]["content"].splitlines()
        wrong = pair["rejected"][2]["content"].splitlines()
        assert len(wrong) == 3 and sum(a != b for a, b in zip(right, wrong)) == 1, (right, wrong)
    assert script.make_pairs(rows, random.Random(0)) == script.make_pairs(rows, random.Random(0))


def test_validate_passes_the_quickstart_dpo_recipe(tmp_path):
    sft = write_adapter_run(tmp_path / "quickstart", REPO / "recipes" / "quickstart" / "base_model")
    result = CliRunner().invoke(main, ["validate", str(REPO / "recipes" / "dpo" / "quickstart-dpo.yaml"),
                                       f"model.name_or_path={sft}", f"training.output_dir={tmp_path / 'dpo'}",
                                       "--samples", "1"])
    assert result.exit_code == 0, result.output
    assert "train: 2,000 pairs" in result.output and "test.jsonl: preference (conversational), 200 of 200" in \
        result.output
    assert "city: " in result.output and "<|im_end|>]]" in result.output
