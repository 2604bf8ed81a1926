"""Rows for `lorakit classify`: a text (or a text pair) and a label per row, from any source sft reads (json, jsonl,
csv, parquet, arrow, Hub datasets, with the same `columns:` renames), tokenized for a sequence-classification head.

Every label is checked against the task: a missing label, a name not among the labels, a fraction where a class
is expected, text where a number is expected. Each such row is named by file and row and stops the run, or is
left out and counted when the recipe says `task.bad_labels: drop`. The class counts go to the summary and the
run record.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.sources import load_renamed, source_fingerprint
from lorakit.errors import DataError

MAX_REPORTED_ROW_ERRORS = 20
PROBLEM_TYPES = {"classification": "single_label_classification", "multi_label": "multi_label_classification",
                 "regression": "regression"}


@dataclass
class LabelSpace:
    """What the head predicts: the task type and the label names in class-id order (regression: one score)."""

    type: str  # classification | multi_label | regression
    names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def head_config(self, pad_token_id: int | None) -> dict[str, Any]:
        """The model config fields of the head, as AutoModelForSequenceClassification.from_pretrained takes them."""
        return {"num_labels": self.num_labels, "problem_type": PROBLEM_TYPES[self.type],
                "id2label": dict(enumerate(self.names)), "label2id": {n: i for i, n in enumerate(self.names)},
                "pad_token_id": pad_token_id}


@dataclass
class SourceRows:
    name: str
    rows: int
    used_rows: int
    fingerprint: str


@dataclass
class SplitReport:
    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_bad_label: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)  # rows per label (multi_label: rows having it)
    scores: dict[str, float] = field(default_factory=dict)  # regression: min, mean, max of the labels
    sources: list[SourceRows] = field(default_factory=list)
    dropped_examples: list[str] = field(default_factory=list)  # the first few dropped rows, and why

    def to_dict(self) -> dict[str, Any]:
        out = {key: value for key, value in self.__dict__.items() if key != "sources"}
        return {**out, "sources": [s.__dict__ for s in self.sources]}


@dataclass
class ClassifyData:
    train: Any  # datasets.Dataset: input_ids, attention_mask (token_type_ids), labels
    eval: Any | None
    labels: LabelSpace
    reports: dict[str, SplitReport]


# ---------------------------------------------------------------- reading rows


@dataclass
class RawRows:
    """One source's rows as read: texts, optional pairs, labels as written, and where each came from."""

    name: str
    texts: list[Any]
    pairs: list[Any] | None
    labels: list[Any]
    numbers: list[int]  # 1-based row numbers in the source
    class_names: list[str] | None  # a Hub ClassLabel feature's names, when the label column has one
    fingerprint: str


def read_source(source: dict, task: dict, need_labels: bool = True) -> RawRows:
    """A source's text, pair and label columns, after its `columns:` renames ({task name: source column})."""
    name = source["path"]
    dataset = load_renamed(source)
    wanted = [task["text_column"]] + ([task["text_pair_column"]] if task.get("text_pair_column") else [])
    wanted += [task["label_column"]] if need_labels else []
    absent = [column for column in wanted if column not in dataset.column_names]
    if absent:
        raise DataError(f"{name}: no column {', '.join(absent)} (it has {', '.join(dataset.column_names)}); set "
                        f"task.text_column / task.label_column, or rename on the source with "
                        f"columns: {{{absent[0]}: your_column}}")
    if len(dataset) == 0:
        raise DataError(f"{name}: has no rows")
    label_feature = dataset.features.get(task["label_column"]) if need_labels else None
    feature = getattr(label_feature, "feature", label_feature)  # Sequence(ClassLabel) for multi-label data
    column = lambda name: list(dataset[name])
    return RawRows(name=name, texts=column(task["text_column"]),
                   pairs=column(task["text_pair_column"]) if task.get("text_pair_column") else None,
                   labels=column(task["label_column"]) if need_labels else [None] * len(dataset),
                   numbers=list(range(1, len(dataset) + 1)), class_names=getattr(feature, "names", None),
                   fingerprint=source_fingerprint(source, dataset))


def check_texts(raw: RawRows, task: dict) -> None:
    """Every row needs its text (and pair): a row without one is a data error, whatever bad_labels says."""
    problems = []
    for column, values in ((task["text_column"], raw.texts), (task.get("text_pair_column"), raw.pairs)):
        for number, value in zip(raw.numbers, values or []):
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{raw.name}: row {number}: '{column}' must be a non-empty string, got {show(value)}")
    raise_problems(problems)


# ---------------------------------------------------------------- labels


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def label_name(value: Any, class_names: list[str] | None, declared: list[str] | None) -> str:
    """The label name a single-label value stands for; ValueError says what is wrong with it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"label {value!r} has a fraction; classification labels are names or whole numbers "
                             "(for a score to predict, set task.type: regression)")
        value = int(value)  # a whole number stored as a float (a csv column with empty cells reads as floats)
    if isinstance(value, int):
        if class_names is not None:  # the dataset's own ClassLabel: the number is a position in its names
            if not 0 <= value < len(class_names):
                raise ValueError(f"label {value} is not a class of the dataset (0-{len(class_names) - 1})")
            return class_names[value]
        if declared is not None and not all(name.lstrip("-").isdigit() for name in declared):
            if not 0 <= value < len(declared):
                raise ValueError(f"label {value} is not a position in task.labels (0-{len(declared) - 1}: "
                                 f"{', '.join(declared)})")
            return declared[value]
        return str(value)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)):
        raise ValueError(f"label is a list ({show(value)}); for several labels per row set task.type: multi_label")
    raise ValueError(f"label {show(value)} is neither a name nor a whole number")


def check_known(name: str, names: list[str] | None) -> str:
    if names is not None and name not in names:
        from lorakit.recipe.schema import closest

        close = closest(name, names)
        raise ValueError(f"unknown label {name!r}; the labels are {', '.join(names)}"
                         + (f" (did you mean {close!r}?)" if close else ""))
    return name


def row_label(value: Any, kind: str, raw: RawRows, names: list[str] | None) -> Any:
    """A checked label: a name (classification), a list of names (multi_label) or a float (regression)."""
    if is_missing(value) or (raw.class_names is not None and value == -1):  # -1: a Hub split without labels
        raise ValueError("label is missing")
    if kind == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"label {show(value)} is not a number, as a regression task needs")
        if not math.isfinite(value):
            raise ValueError(f"label {value} is not a finite number")
        return float(value)
    if kind == "multi_label":
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"label {show(value)} is not a list of labels, as a multi_label task needs")
        return sorted({check_known(label_name(item, raw.class_names, names), names) for item in value})
    return check_known(label_name(value, raw.class_names, names), names)


def declared_names(task: dict, first: RawRows) -> list[str] | None:
    """task.labels, else the dataset's ClassLabel names (in its order), else None: read from the data."""
    if task["type"] == "regression":
        return [task["label_column"]]
    return task.get("labels") or first.class_names


def found_names(labels: list[Any]) -> list[str]:
    """The label names of the data, sorted (numbers in numeric order)."""
    found = {name for label in labels for name in (label if isinstance(label, list) else [label])}
    numeric = all(name.lstrip("-").isdigit() for name in found)
    return sorted(found, key=int) if numeric else sorted(found)


def check_labels(raw: RawRows, task: dict, names: list[str] | None, report: SplitReport) -> tuple[list[int], list]:
    """(indices of usable rows, their labels); bad rows stop the run, or are dropped and counted."""
    keep, labels, problems = [], [], []
    for index, (number, value) in enumerate(zip(raw.numbers, raw.labels)):
        try:
            labels.append(row_label(value, task["type"], raw, None if task["type"] == "regression" else names))
            keep.append(index)
        except ValueError as error:
            problems.append(f"{raw.name}: row {number}: {error}")
    if problems and task["bad_labels"] == "drop":
        report.dropped_bad_label += len(problems)
        report.dropped_examples += problems[:5 - len(report.dropped_examples)]
    elif problems:
        hint = "fix these rows, or set task.bad_labels: drop to leave such rows out (counted in the summary)"
        raise_problems(problems, hint)
    return keep, labels


def raise_problems(problems: list[str], hint: str = "") -> None:
    if not problems:
        return
    lines = problems[:MAX_REPORTED_ROW_ERRORS]
    if len(problems) > MAX_REPORTED_ROW_ERRORS:
        lines.append(f"... and {len(problems) - MAX_REPORTED_ROW_ERRORS} more such rows")
    raise DataError("\n".join(lines + ([hint] if hint else [])))


def encode_label(label: Any, space: LabelSpace) -> Any:
    """The label as the head's loss takes it: a class id, a 0/1 float per label, or the number."""
    if space.type == "regression":
        return label
    if space.type == "multi_label":
        return [1.0 if name in label else 0.0 for name in space.names]
    return space.names.index(label)


# ---------------------------------------------------------------- tokenizing and splitting


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, truncation: str,
             name: str, numbers: list[int], report: SplitReport) -> tuple[dict[str, list], list[int]]:
    """(tokenizer output, indices of the rows kept); long rows are cut, dropped or refused as data.truncation says."""
    # Measured uncut first (verbose=False: the tokenizer would warn about the rows that are long, handled below).
    encoded = dict(tokenizer(texts, pairs, verbose=False) if pairs is not None else tokenizer(texts, verbose=False))
    long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
    if long and truncation == "error":
        shown = ", ".join(f"row {numbers[i]} ({len(encoded['input_ids'][i])} tokens)" for i in long[:10])
        raise DataError(f"{name}: {len(long)} rows longer than data.max_length={max_length}: {shown}. "
                        "Raise max_length, or set data.truncation: truncate or drop")
    if long and truncation == "truncate":
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs is not None else None,
                        truncation=True, max_length=max_length)
        for key in encoded:
            for position, i in enumerate(long):
                encoded[key][i] = cut[key][position]
        report.truncated += len(long)
        long = []
    report.dropped_too_long += len(long)
    dropped = set(long)
    keep = [i for i in range(len(texts)) if i not in dropped]
    return {key: [values[i] for i in keep] for key, values in encoded.items()}, keep


def sample(indices: list[int], source: dict, seed: int) -> list[int]:
    """A source's fraction (a seeded subsample) or weight (a repeat factor) applied to its rows."""
    factor = source.get("fraction") or source.get("weight")
    if not factor or factor == 1:
        return indices
    whole, part = int(factor), factor - int(factor)
    shuffled = indices[:]
    random.Random(seed).shuffle(shuffled)
    return indices * whole + shuffled[:int(round(part * len(indices)))]


def held_out(labels: list[Any], fraction: float, seed: int, stratify: bool) -> list[int]:
    """Indices of the rows to hold out for evaluation: seeded, and per class for classification (every class with
    two or more rows keeps rows on both sides), so a small eval split still has the training mix of classes."""
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label if stratify else None, []).append(index)
    chosen = []
    for key in sorted(groups, key=str):
        members = groups[key]
        rng.shuffle(members)
        count = int(round(fraction * len(members)))
        chosen += members[:min(max(count, 1 if len(members) > 1 else 0), len(members) - 1)]
    return sorted(chosen)


# ---------------------------------------------------------------- the split and the whole


def prepare_split(sources: list[dict], task: dict, names: list[str] | None, data_section: dict, tokenizer,
                  seed: int, first: RawRows | None = None) -> tuple[dict[str, list], SplitReport, list]:
    """(columns of the tokenized rows with their labels as checked, the split's report, the rows' label names).
    `first`: the first source, when it has been read already."""
    report = SplitReport()
    columns: dict[str, list] = {}
    all_labels: list = []
    for index, source in enumerate(sources):
        raw = first if index == 0 and first is not None else read_source(source, task)
        check_texts(raw, task)
        keep, labels = check_labels(raw, task, names, report)
        take = lambda values, rows: [values[i] for i in rows]
        encoded, kept = tokenize(tokenizer, take(raw.texts, keep), take(raw.pairs, keep) if raw.pairs else None,
                                 data_section["max_length"], data_section["truncation"], raw.name,
                                 take(raw.numbers, keep), report)
        labels = take(labels, kept)
        rows = sample(list(range(len(labels))), source, seed)
        for key, values in encoded.items():
            columns.setdefault(key, []).extend(values[i] for i in rows)
        all_labels += [labels[i] for i in rows]
        report.sources.append(SourceRows(raw.name, len(raw.texts), len(rows), raw.fingerprint))
    return columns, report, all_labels


def count_labels(labels: list, space: LabelSpace, report: SplitReport, columns: dict) -> None:
    report.rows = len(labels)
    report.tokens = sum(len(ids) for ids in columns.get("input_ids", []))
    if space.type == "regression":
        report.scores = {"min": min(labels), "mean": sum(labels) / len(labels), "max": max(labels)} if labels else {}
        return
    counts = Counter(name for label in labels for name in (label if isinstance(label, list) else [label]))
    report.label_counts = {name: counts.get(name, 0) for name in space.names}


def to_dataset(columns: dict, labels: list, space: LabelSpace) -> Any:
    import datasets

    return datasets.Dataset.from_dict({**columns, "labels": [encode_label(label, space) for label in labels]})


def prepare_classification_data(data_section: dict, task: dict, tokenizer, seed: int = 42) -> ClassifyData:
    """Train (and eval) datasets for the head, the label space, and a report of what was used or left out."""
    sources = data_section["train"]
    first = read_source(sources[0], task)
    names = declared_names(task, first)
    columns, train_report, labels = prepare_split(sources, task, names, data_section, tokenizer, seed, first)
    if not labels:
        raise DataError("no training rows left after checking labels and lengths; see the rows named above")
    space = LabelSpace(task["type"], names or found_names(labels))
    if task["type"] != "regression" and space.num_labels < 2:
        raise DataError(f"the training data has a single label ({space.names[0]}); a classifier needs at least two")
    eval_columns, eval_report, eval_labels = None, None, None
    if data_section.get("eval"):
        eval_columns, eval_report, eval_labels = prepare_split(data_section["eval"], task, space.names, data_section,
                                                               tokenizer, seed)
    elif data_section.get("eval_fraction"):
        held = set(held_out(labels, data_section["eval_fraction"], seed, stratify=task["type"] == "classification"))
        split = lambda values, inside: [v for i, v in enumerate(values) if (i in held) == inside]
        eval_columns = {key: split(values, True) for key, values in columns.items()}
        columns = {key: split(values, False) for key, values in columns.items()}
        eval_labels, labels = split(labels, True), split(labels, False)
        eval_report = SplitReport(sources=[SourceRows(f"{data_section['eval_fraction']:.0%} of train", len(held),
                                                      len(held), "-")])
    count_labels(labels, space, train_report, columns)
    reports = {"train": train_report}
    eval_dataset = None
    if eval_columns is not None:
        if not eval_labels:
            raise DataError("no evaluation rows left after checking labels and lengths")
        count_labels(eval_labels, space, eval_report, eval_columns)
        reports["eval"] = eval_report
        eval_dataset = to_dataset(eval_columns, eval_labels, space)
    return ClassifyData(train=to_dataset(columns, labels, space), eval=eval_dataset, labels=space, reports=reports)


def balanced_weights(report: SplitReport, space: LabelSpace) -> list[float]:
    """task.class_weights: balanced. Classification: rows / (classes x rows of the class). Multi-label: each label's
    negatives / positives (BCE's pos_weight)."""
    counts = [report.label_counts.get(name, 0) for name in space.names]
    if space.type == "multi_label":
        never = [f"{name} is on {'no' if count == 0 else 'every'} row" for name, count in zip(space.names, counts)
                 if count in (0, report.rows)]
        if never:
            raise DataError("task.class_weights: balanced needs training rows with and without each label; "
                            + ", ".join(never))
        return [(report.rows - count) / count for count in counts]
    empty = [name for name, count in zip(space.names, counts) if count == 0]
    if empty:
        raise DataError(f"task.class_weights: balanced needs training rows of every label; {', '.join(empty)} has none")
    return [report.rows / (space.num_labels * count) for count in counts]


def show(value: Any) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False, default=str) if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."
