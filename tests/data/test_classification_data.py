"""Labelled rows for `lorakit classify`: labels read as the task says, every bad label named by file and row (or
dropped and counted), class counts, pairs, truncation, the held-out split and balanced weights."""

from __future__ import annotations

import pytest

from conftest import build_tokenizer, write_jsonl
from lorakit.data.classification import balanced_weights, prepare_classification_data
from lorakit.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("classify-tokenizer"))


def task(**extra):
    return {"type": "classification", "text_column": "text", "text_pair_column": None, "label_column": "label",
            "labels": None, "class_weights": None, "bad_labels": "error", "head_only": False, **extra}


def data(*paths, **extra):
    sources = [{"path": str(p), "split": "train", "name": None, "revision": None, "format": None, "columns": {},
                "fraction": None, "weight": None} for p in paths]
    return {"train": sources, "eval": None, "eval_fraction": None, "max_length": 64, "truncation": "truncate",
            **extra}


def rows(*labels, text="the sky is blue"):
    return [{"text": f"{text} {i}", "label": label} for i, label in enumerate(labels)]


def test_names_are_read_from_the_data_sorted_and_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows("water", "sky", "sky", "honey", "sky"))
    prepared = prepare_classification_data(data(path), task(), tokenizer)
    assert prepared.labels.names == ["honey", "sky", "water"]
    assert prepared.train["labels"] == [2, 1, 1, 0, 1]
    assert prepared.reports["train"].label_counts == {"honey": 1, "sky": 3, "water": 1}
    assert prepared.labels.head_config(1)["id2label"] == {0: "honey", 1: "sky", 2: "water"}


def test_whole_numbers_are_positions_in_declared_names_and_names_of_their_own_otherwise(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(1, 0, 2, 10))
    assert prepare_classification_data(data(path), task(), tokenizer).labels.names == ["0", "1", "2", "10"]
    path = write_jsonl(tmp_path / "e.jsonl", rows(1, 0, 2, 2.0))  # 2.0: a whole number a csv stores as a float
    prepared = prepare_classification_data(data(path), task(labels=["neg", "neutral", "pos"]), tokenizer)
    assert prepared.train["labels"] == [1, 0, 2, 2]
    stars = prepare_classification_data(data(path), task(labels=["0", "1", "2"]), tokenizer)
    assert stars.train["labels"] == [1, 0, 2, 2]


BAD_LABELS = [
    ("missing", rows("sky", None), "row 2: label is missing"),
    ("empty", rows("sky", "  "), "row 2: label is missing"),
    ("unknown", rows("sky", "skyy"), "row 2: unknown label 'skyy'; the labels are sky, water (did you mean 'sky'?)"),
    ("fraction", rows("sky", 0.5), "row 2: label 0.5 has a fraction; classification labels are names or whole"),
    ("list", rows("sky", ["sky"]), "row 2: label is a list ([\"sky\"]); for several labels per row set task.type: "
                                   "multi_label"),
    ("position", rows(0, 7), "row 2: label 7 is not a position in task.labels (0-1: sky, water)"),
]


@pytest.mark.parametrize("case, labelled, message", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
def test_a_bad_classification_label_is_named_by_file_and_row(tokenizer, tmp_path, case, labelled, message):
    path = write_jsonl(tmp_path / f"{case}.jsonl", labelled)
    with pytest.raises(DataError) as error:
        prepare_classification_data(data(path), task(labels=["sky", "water"]), tokenizer)
    assert f"{path}: {message}" in str(error.value)
    assert "task.bad_labels: drop" in str(error.value)


@pytest.mark.parametrize("value, message", [("3.5", "label \"3.5\" is not a number"), (True, "label true is not a"),
                                            (None, "label is missing"), (float("nan"), "label is missing")])
def test_a_regression_label_must_be_a_number(tokenizer, tmp_path, value, message):
    # One row each: Arrow gives a column one type, so a number and a string in one file read back as one kind.
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "c d", "label": value}])
    with pytest.raises(DataError, match=rf"r.jsonl: row 1: {message}"):
        prepare_classification_data(data(path), task(type="regression"), tokenizer)


def test_a_multi_label_row_holds_a_list_of_known_labels(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": ["sky", "water"]}, {"text": "b", "label": []},
                                              {"text": "c", "label": ["water"]}])
    prepared = prepare_classification_data(data(path), task(type="multi_label"), tokenizer)
    assert prepared.train["labels"] == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    assert prepared.reports["train"].label_counts == {"sky": 1, "water": 2}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": ["sky"]}, {"text": "b", "label": "sky"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: label \"sky\" is not a list of labels"):
        prepare_classification_data(data(bad), task(type="multi_label"), tokenizer)


def test_drop_leaves_bad_rows_out_and_counts_them(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows("sky", None, "water", "sun", "sky"))
    prepared = prepare_classification_data(data(path), task(labels=["sky", "water"], bad_labels="drop"), tokenizer)
    report = prepared.reports["train"]
    assert prepared.train["labels"] == [0, 1, 0]
    assert report.dropped_bad_label == 2 and report.rows == 3
    assert report.dropped_examples[0].endswith("row 2: label is missing")


def test_eval_labels_must_be_among_the_training_labels(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows("sky", "water", "sky"))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows("sky", "honey"))
    section = data(train)
    section["eval"] = data(evaluation)["train"]
    with pytest.raises(DataError, match=r"eval.jsonl: row 2: unknown label 'honey'; the labels are sky, water"):
        prepare_classification_data(section, task(), tokenizer)


def test_a_row_without_text_is_an_error_whatever_bad_labels_says(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "", "label": "y"}])
    with pytest.raises(DataError, match=r"t.jsonl: row 2: 'text' must be a non-empty string"):
        prepare_classification_data(data(path), task(bad_labels="drop"), tokenizer)


def test_csv_with_renamed_columns_and_text_pairs(tokenizer, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("premise,hypothesis,verdict\nthe sky is blue,the sky is red,no\nfish live in water,fish swim,yes\n",
                    encoding="utf-8")
    section = data(path)
    section["train"][0]["columns"] = {"text": "premise", "label": "verdict"}
    prepared = prepare_classification_data(section, task(text_pair_column="hypothesis"), tokenizer)
    assert prepared.labels.names == ["no", "yes"]
    both = tokenizer("the sky is blue", "the sky is red")["input_ids"]
    assert prepared.train[0]["input_ids"] == both


def test_a_missing_column_says_which_and_how_to_map_it(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"review": "good", "label": "pos"}])
    with pytest.raises(DataError, match=r"c.jsonl: no column text \(it has review, label\).*columns: \{text: your_column\}"):
        prepare_classification_data(data(path), task(), tokenizer)


def test_long_rows_are_cut_dropped_or_refused_as_data_truncation_says(tokenizer, tmp_path):
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": long_text, "label": "a"}, {"text": "short", "label": "b"},
                                              {"text": "short too", "label": "a"}])
    cut = prepare_classification_data(data(path, max_length=16), task(), tokenizer)
    assert len(cut.train[0]["input_ids"]) == 16 and cut.reports["train"].truncated == 1
    dropped = prepare_classification_data(data(path, max_length=16, truncation="drop"), task(), tokenizer)
    assert dropped.reports["train"].dropped_too_long == 1 and dropped.reports["train"].rows == 2
    with pytest.raises(DataError, match=r"l.jsonl: 1 rows longer than data.max_length=16: row 1 \("):
        prepare_classification_data(data(path, max_length=16, truncation="error"), task(), tokenizer)


def test_the_held_out_split_keeps_every_class_on_both_sides(tokenizer, tmp_path):
    labels = ["a"] * 40 + ["b"] * 8 + ["c"] * 2
    path = write_jsonl(tmp_path / "s.jsonl", rows(*labels))
    prepared = prepare_classification_data(data(path, eval_fraction=0.25), task(), tokenizer)
    assert prepared.reports["eval"].label_counts == {"a": 10, "b": 2, "c": 1}
    assert prepared.reports["train"].label_counts == {"a": 30, "b": 6, "c": 1}
    again = prepare_classification_data(data(path, eval_fraction=0.25), task(), tokenizer)
    assert again.eval["input_ids"] == prepared.eval["input_ids"]  # seeded


def test_balanced_weights_make_each_class_weigh_the_same(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", rows(*["a"] * 6, *["b"] * 2))
    prepared = prepare_classification_data(data(path), task(), tokenizer)
    weights = balanced_weights(prepared.reports["train"], prepared.labels)
    assert weights == [8 / (2 * 6), 8 / (2 * 2)]
    assert weights[0] * 6 == weights[1] * 2
    declared = prepare_classification_data(data(path), task(labels=["a", "b", "c"]), tokenizer)
    with pytest.raises(DataError, match="balanced needs training rows of every label; c has none"):
        balanced_weights(declared.reports["train"], declared.labels)
