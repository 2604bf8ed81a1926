"""Preference pairs are tokenized as sft tokenizes a conversation: the scored tokens of each response are exactly
those sft trains (reply + end-of-turn token), the prompt is shared, and every unusable row is named or counted."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from lorakit.data.labels import IGNORE, Tokenization
from lorakit.data.preferences import prepare_pairs
from lorakit.errors import DataError

SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "What colour is the sky?"}
BLUE = {"role": "assistant", "content": "The sky is blue."}
RED = {"role": "assistant", "content": "Mars is the red planet."}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from lorakit.models.loading import load_tokenizer

    return load_tokenizer({"name_or_path": str(tiny_llama)})[0]


def data_section(path, **changes) -> dict:
    return {"train": [{"path": str(path), "columns": {}}], "eval": None, "eval_fraction": None, "max_length": 128,
            "truncation": "truncate", "train_on": "completions", **changes}


def sft_reply(tokenizer, messages) -> tuple[list[int], list[int]]:
    """(prompt ids, trained ids of the last reply) as sft labels the conversation."""
    ids, labels = Tokenization.for_tokenizer(tokenizer, "completions").encode({"messages": messages})
    end = max(i for i, label in enumerate(labels) if label != IGNORE) + 1
    start = end
    while labels[start - 1] != IGNORE:
        start -= 1
    return ids[:start], ids[start:end]


def test_conversation_pairs_score_exactly_what_sft_trains(tokenizer, tmp_path):
    rows = [{"chosen": [SYSTEM, USER, BLUE], "rejected": [SYSTEM, USER, RED]}]
    pair = prepare_pairs(data_section(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer).train[0]
    prompt, chosen = sft_reply(tokenizer, [SYSTEM, USER, BLUE])
    _, rejected = sft_reply(tokenizer, [SYSTEM, USER, RED])
    assert pair["prompt_ids"] == prompt
    assert pair["chosen_ids"] == chosen and pair["rejected_ids"] == rejected
    assert tokenizer.decode(pair["chosen_ids"]) == "The sky is blue.<|im_end|>"  # no separator after the turn


def test_every_row_shape_gives_the_same_tokens(tokenizer, tmp_path):
    implicit = {"chosen": [USER, BLUE], "rejected": [USER, RED]}
    explicit = {"prompt": [USER], "chosen": [BLUE], "rejected": [RED]}
    ultrafeedback = {"prompt": USER["content"], "chosen": [USER, BLUE], "rejected": [USER, RED], "score": 1}
    prompt_string = {"prompt": USER["content"], "chosen": [BLUE], "rejected": [RED]}
    got = prepare_pairs(data_section(write_jsonl(tmp_path / "p.jsonl", [implicit, explicit, ultrafeedback,
                                                                        prompt_string])), tokenizer).train
    assert all(dict(row) == dict(got[0]) for row in got)


def test_a_multi_turn_prompt_scores_only_the_final_reply(tokenizer, tmp_path):
    earlier = [USER, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Say it in full."}]
    rows = [{"chosen": earlier + [BLUE], "rejected": earlier + [RED]}]
    pair = prepare_pairs(data_section(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer).train[0]
    assert "Blue.<|im_end|>" in tokenizer.decode(pair["prompt_ids"])  # the earlier reply is context, not scored
    assert tokenizer.decode(pair["chosen_ids"]) == "The sky is blue.<|im_end|>"
    assert tokenizer.decode(pair["rejected_ids"]) == "Mars is the red planet.<|im_end|>"


def test_text_pairs_end_with_eos_as_sft_prompt_completion_rows(tokenizer, tmp_path):
    rows = [{"prompt": "What colour is the sky? ", "chosen": "The sky is blue.", "rejected": "Mars is red."}]
    pair = prepare_pairs(data_section(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer).train[0]
    ids, labels = Tokenization.for_tokenizer(tokenizer, "completions").encode(
        {"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"]})
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert pair["prompt_ids"] + pair["chosen_ids"] == ids and len(pair["prompt_ids"]) == start
    assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id


BAD_ROWS = [
    ({"chosen": [USER, BLUE], "rejected": [USER, BLUE]}, "chosen equals rejected", "are the same conversation"),
    ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "chosen equals rejected", "are the same response"),
    ({"prompt": "Q", "chosen": "A", "rejected": "  "}, "empty response", "'rejected' is empty"),
    ({"chosen": [USER, {"role": "assistant", "content": ""}], "rejected": [USER, RED]}, "empty response",
     "empty assistant turn"),
    ({"chosen": [USER, BLUE]}, "missing field", "has no 'rejected'"),
    ({"chosen": [USER, BLUE], "rejected": None}, "missing field", "has no 'rejected'"),
    ({"chosen": "A", "rejected": "B"}, "missing field", "no 'prompt' string"),
    ({"chosen": [BLUE], "rejected": [RED]}, "missing field", "share no message to be the prompt"),
    ({"chosen": [USER, BLUE, USER, BLUE], "rejected": [USER, RED, USER, BLUE]}, "not a pair",
     "differ before their last reply"),
]


def test_every_bad_row_is_named_by_file_and_row_or_dropped_and_counted(tokenizer, tmp_path):
    good = {"chosen": [USER, BLUE], "rejected": [USER, RED]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good] + [row for row, _, _ in BAD_ROWS])
    with pytest.raises(DataError) as raised:
        prepare_pairs(data_section(path), tokenizer)
    lines = str(raised.value).splitlines()
    for number, (_, _, message) in enumerate(BAD_ROWS, start=2):
        assert any(line.startswith(f"{path}: row {number}: ") and message in line for line in lines), message
    assert lines[-1] == "(or set preference.on_bad_rows: drop to leave such rows out, counted)"
    kept = prepare_pairs(data_section(path), tokenizer, on_bad_rows="drop")
    expected: dict[str, int] = {}
    for _, reason, _ in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert len(kept.train) == 1 and kept.reports["train"].dropped_bad_rows == expected


def test_a_source_without_pair_columns_says_how_to_map_them(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "Q", "good": "A", "bad": "B"}])
    with pytest.raises(DataError, match=r"need columns chosen and rejected .* columns: \{chosen: your_column\}"):
        prepare_pairs(data_section(path), tokenizer)
    section = data_section(path)
    section["train"][0]["columns"] = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert len(prepare_pairs(section, tokenizer).train) == 1


def test_long_pairs_follow_data_truncation(tokenizer, tmp_path):
    long_reply = {"role": "assistant", "content": "The sky is blue. " * 20}
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": [USER, BLUE], "rejected": [USER, RED]},
                                                  {"chosen": [USER, long_reply], "rejected": [USER, RED]}])
    with pytest.raises(DataError, match=r"1 pairs longer than data.max_length=40 .*row 2"):
        prepare_pairs(data_section(path, max_length=40, truncation="error"), tokenizer)
    dropped = prepare_pairs(data_section(path, max_length=40, truncation="drop"), tokenizer)
    assert len(dropped.train) == 1 and dropped.reports["train"].dropped_too_long == 1
    cut = prepare_pairs(data_section(path, max_length=40), tokenizer)
    assert cut.reports["train"].truncated == 1
    assert max(len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in cut.train) == 40


def test_eval_fraction_holds_out_pairs_with_the_seed(tokenizer, tmp_path):
    rows = [{"chosen": [{"role": "user", "content": f"Q{i}"}, BLUE], "rejected": [{"role": "user", "content": f"Q{i}"},
                                                                                  RED]} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    first = prepare_pairs(data_section(path, eval_fraction=0.25), tokenizer)
    again = prepare_pairs(data_section(path, eval_fraction=0.25), tokenizer)
    assert len(first.train) == 15 and len(first.eval) == 5
    assert first.eval["prompt_ids"] == again.eval["prompt_ids"]
    assert first.reports["train"].to_dict()["pairs"] == 15
