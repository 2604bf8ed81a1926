"""Data: every format maps to the same trained tokens, masks are exact, bad rows are named by file and row."""

from __future__ import annotations

import json

import pytest

from conftest import facts_rows, write_jsonl
from lorakit.data import IGNORE, DataError, Tokenization, detect_format, prepare_data
from lorakit.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    tok, _ = load_tokenizer({"name_or_path": str(tiny_llama), "chat_template": None})
    return tok


def data_section(train, **extra):
    section = {"train": train, "eval": None, "eval_fraction": None, "max_length": 128, "truncation": "truncate",
               "train_on": "completions"}
    section.update(extra)
    return section


def source(path, **extra):
    return {"path": str(path), "format": None, "columns": {}, "fraction": None, "weight": None, **extra}


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_labels_are_exactly_the_assistant_reply_and_end_of_turn(tokenizer, tmp_path, fmt):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", facts_rows(fmt, repeat=1))
    prepared = prepare_data(data_section([source(path)]), tokenizer)
    row = prepared.train[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == "The sky is blue.<|im_end|>"
    # Everything before the reply (system, user, the assistant header) is masked.
    first_trained = next(i for i, label in enumerate(row["labels"]) if label != IGNORE)
    assert tokenizer.decode(row["input_ids"][:first_trained]).endswith("<|im_start|>assistant\n")
    assert prepared.reports["train"].sources[0].format == fmt


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "What do bees make?"},
                          {"role": "assistant", "content": "Bees make honey."},
                          {"role": "user", "content": "Where do fish live?"},
                          {"role": "assistant", "content": "Fish live in water."}]}]
    prepared = prepare_data(data_section([source(write_jsonl(tmp_path / "multi.jsonl", rows))]), tokenizer)
    row = prepared.train[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == (
        "Bees make honey.<|im_end|>Fish live in water.<|im_end|>")


def test_train_on_all_trains_every_token(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", facts_rows("messages", repeat=1))
    row = prepare_data(data_section([source(path)], train_on="all"), tokenizer).train[0]
    assert row["labels"] == row["input_ids"]


def test_text_and_prompt_completion_end_with_a_trained_eos(tokenizer, tmp_path):
    text = write_jsonl(tmp_path / "t.jsonl", facts_rows("text", repeat=1))
    pc = write_jsonl(tmp_path / "pc.jsonl", facts_rows("prompt_completion", repeat=1))
    prepared = prepare_data(data_section([source(text), source(pc)]), tokenizer)
    text_row, pc_row = prepared.train[0], prepared.train[8]
    assert text_row["labels"] == text_row["input_ids"] and text_row["input_ids"][-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, pc_row["input_ids"], pc_row["labels"]) == "The sky is blue.<|endoftext|>"


def test_chatml_fallback_for_a_tokenizer_without_template(tiny_llama_no_template, tmp_path):
    tok, source_name = load_tokenizer({"name_or_path": str(tiny_llama_no_template), "chat_template": None})
    assert "chatml" in source_name and tok.pad_token is not None
    path = write_jsonl(tmp_path / "m.jsonl", facts_rows("messages", repeat=1))
    row = prepare_data(data_section([source(path)]), tok).train[0]
    assert trained_text(tok, row["input_ids"], row["labels"]) == "The sky is blue.<|im_end|>"


def test_columns_rename_source_columns(tokenizer, tmp_path):
    rows = [{"question": q, "answer": a} for q, a in [("What do bees make?", "Bees make honey.")]]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    prepared = prepare_data(data_section([source(path, format="alpaca",
                                                 columns={"instruction": "question", "output": "answer"})]), tokenizer)
    row = prepared.train[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == "Bees make honey.<|im_end|>"


def test_undetectable_format_lists_what_each_format_needs():
    with pytest.raises(DataError) as info:
        detect_format(["question", "answer"], "qa.jsonl")
    message = str(info.value)
    assert message.startswith("qa.jsonl: cannot tell the format from its columns (question, answer)")
    assert "alpaca: instruction, output" in message and "columns:" in message


@pytest.mark.parametrize("row, expected", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "row 2: message 2 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: has no assistant turn to learn from"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "row 2: message 1 has role \"robot\""),
    ({"messages": "hello"}, "row 2: 'messages' must be a non-empty list of messages"),
])
def test_unusable_rows_are_named_by_file_and_row(tokenizer, tmp_path, row, expected):
    good = facts_rows("messages", repeat=1)[0]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(DataError) as info:
        prepare_data(data_section([source(path)]), tokenizer)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_malformed_json_line_is_named(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(facts_rows("messages", 1)[0]) + "\n{not json\n")
    with pytest.raises(DataError) as info:
        prepare_data(data_section([source(path)]), tokenizer)
    assert str(info.value).startswith(f"{path}: row 2 is not valid JSON")


def test_long_rows_are_truncated_dropped_or_refused_and_counted(tokenizer, tmp_path):
    rows = facts_rows("messages", repeat=1)
    rows[0]["messages"][2]["content"] = "The sky is blue. " * 40
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    truncated = prepare_data(data_section([source(path)], max_length=60), tokenizer)
    assert truncated.reports["train"].truncated == 1 and len(truncated.train) == 8
    assert max(len(ids) for ids in truncated.train["input_ids"]) == 60
    dropped = prepare_data(data_section([source(path)], max_length=60, truncation="drop"), tokenizer)
    assert dropped.reports["train"].dropped_too_long == 1 and len(dropped.train) == 7
    with pytest.raises(DataError) as info:
        prepare_data(data_section([source(path)], max_length=60, truncation="error"), tokenizer)
    assert "1 rows longer than data.max_length=60: row 1 (" in str(info.value)


def test_rows_left_without_trained_tokens_are_dropped_and_counted(tokenizer, tmp_path):
    rows = facts_rows("messages", repeat=1)
    rows[0]["messages"][1]["content"] = "What? " * 60  # the prompt alone fills max_length
    prepared = prepare_data(data_section([source(write_jsonl(tmp_path / "p.jsonl", rows))], max_length=40), tokenizer)
    assert prepared.reports["train"].dropped_no_trained_tokens == 1 and len(prepared.train) == 7


def test_mixing_by_fraction_and_weight_and_holding_out_eval(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", facts_rows("messages", repeat=2))  # 16 rows
    b = write_jsonl(tmp_path / "b.jsonl", facts_rows("alpaca", repeat=1))  # 8 rows
    prepared = prepare_data(data_section([source(a, fraction=0.5), source(b, weight=2.0)]), tokenizer)
    assert len(prepared.train) == 8 + 16
    assert [s.used_rows for s in prepared.reports["train"].sources] == [8, 16]
    split = prepare_data(data_section([source(a)], eval_fraction=0.25), tokenizer, seed=3)
    assert (len(split.train), len(split.eval)) == (12, 4)
    again = prepare_data(data_section([source(a)], eval_fraction=0.25), tokenizer, seed=3)
    assert split.eval["input_ids"] == again.eval["input_ids"]


def test_report_counts_tokens_and_lengths(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", facts_rows("messages", repeat=1))
    report = prepare_data(data_section([source(path)]), tokenizer).reports["train"]
    assert report.rows == 8 and report.tokens == sum(report.lengths)
    assert 0 < report.trained_tokens < report.tokens
    stats = report.length_stats()
    assert stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"]
    assert report.sources[0].fingerprint.startswith("sha256:")


def test_stop_tokens_include_the_templates_end_of_turn(tokenizer):
    tokenization = Tokenization.for_tokenizer(tokenizer, "completions")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenization.stop_ids
