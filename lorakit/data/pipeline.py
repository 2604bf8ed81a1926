"""The data pipeline: every source loaded, mapped, tokenized with labels, cut to length, mixed and split.

lorakit tokenizes and builds the labels itself, with the same tokenizer calls trl
makes (`apply_chat_template`), and hands trl rows of `input_ids` and `labels`
(trl then only packs or pads them). Doing it here is what lets lorakit name the
file and row of every unusable example, count the rows it truncated or dropped,
mix text with chat data, and show in `lorakit validate` exactly the tokens that
will be trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.formats import FORMAT_COLUMNS, row_to_example
from lorakit.data.labels import IGNORE, Tokenization
from lorakit.data.sources import detect_format, load_renamed, source_fingerprint
from lorakit.errors import DataError

MAX_REPORTED_ROW_ERRORS = 20


@dataclass
class SourceReport:
    name: str
    format: str
    rows: int
    used_rows: int
    fingerprint: str


@dataclass
class SplitReport:
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)
    sources: list[SourceReport] = field(default_factory=list)

    def length_stats(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
        return {"min": ordered[0], "median": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
            "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
            "dropped_no_trained_tokens": self.dropped_no_trained_tokens, "length": self.length_stats(),
            "sources": [s.__dict__ for s in self.sources],
        }


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    reports: dict[str, SplitReport]


# ---------------------------------------------------------------- the pipeline


def prepare_source(source: dict, tokenization: Tokenization, max_length: int, truncation: str,
                   report: SplitReport, seed: int) -> Any:
    """One source: loaded, each row mapped and tokenized, long rows handled, sampled by fraction/weight."""
    import datasets

    name = source["path"]
    dataset = load_renamed(source)
    fmt = source.get("format") or detect_format(dataset.column_names, name)
    needed = [c for c in FORMAT_COLUMNS[fmt] if c not in dataset.column_names]
    if needed:
        raise DataError(f"{name}: format {fmt} needs column(s) {', '.join(needed)}; the data has "
                        f"{', '.join(dataset.column_names)} (map yours with columns: {{{needed[0]}: your_column}})")
    if len(dataset) == 0:
        raise DataError(f"{name}: has no rows")

    def encode(row: dict, index: int) -> dict:
        try:
            example = row_to_example(row, fmt)
            ids, labels = tokenization.encode(example)
        except ValueError as error:
            return {"input_ids": [], "labels": [], "row": index + 1, "error": str(error), "length": 0}
        except Exception as error:  # a chat template that raises on this row (jinja `raise_exception`, ...)
            return {"input_ids": [], "labels": [], "row": index + 1, "length": 0,
                    "error": f"the chat template cannot render it: {error}"}
        return {"input_ids": ids, "labels": labels, "row": index + 1, "error": "", "length": len(ids)}

    encoded = dataset.map(encode, with_indices=True, remove_columns=dataset.column_names,
                          desc=f"Tokenizing {Path(name).name}")
    errors = [(r, e) for r, e in zip(encoded["row"], encoded["error"]) if e]
    if errors:
        lines = [f"{name}: row {row}: {message}" for row, message in errors[:MAX_REPORTED_ROW_ERRORS]]
        more = len(errors) - MAX_REPORTED_ROW_ERRORS
        if more > 0:
            lines.append(f"... and {more} more unusable rows")
        raise DataError("\n".join(lines))

    lengths = encoded["length"]
    too_long = [(row, n) for row, n in zip(encoded["row"], lengths) if n > max_length]
    if too_long and truncation == "error":
        shown = ", ".join(f"row {r} ({n} tokens)" for r, n in too_long[:10])
        raise DataError(f"{name}: {len(too_long)} rows longer than data.max_length={max_length}: {shown}. "
                        "Raise max_length, or set data.truncation: truncate or drop")

    def shorten(row: dict) -> dict:
        return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}

    if too_long and truncation == "drop":
        encoded = encoded.filter(lambda row: row["length"] <= max_length)
        report.dropped_too_long += len(too_long)
    elif too_long:
        encoded = encoded.map(shorten, desc="Truncating")
    trained = encoded.filter(lambda row: any(label != IGNORE for label in row["labels"]))
    report.dropped_no_trained_tokens += len(encoded) - len(trained)
    if too_long and truncation != "drop":
        # Rows cut and kept; a row whose trained tokens were all cut away is counted once, as left out.
        report.truncated += sum(1 for n in trained["length"] if n > max_length)
    encoded = _sample(trained.select_columns(["input_ids", "labels"]), source, seed)
    report.sources.append(SourceReport(name=name, format=fmt, rows=len(dataset), used_rows=len(encoded),
                                       fingerprint=source_fingerprint(source, dataset)))
    del datasets
    return encoded


def _sample(dataset: Any, source: dict, seed: int) -> Any:
    """Apply a source's fraction (subsample) or weight (repeat factor), seeded."""
    import datasets

    factor = source.get("fraction") or source.get("weight")
    if not factor or factor == 1:
        return dataset
    whole, part = int(factor), factor - int(factor)
    pieces = [dataset] * whole
    count = int(round(part * len(dataset)))
    if count:
        pieces.append(dataset.shuffle(seed=seed).select(range(count)))
    return datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]


def prepare_split(sources: list[dict], tokenization: Tokenization, data_section: dict, seed: int) -> tuple[Any, SplitReport]:
    import datasets

    report = SplitReport()
    parts = [prepare_source(s, tokenization, data_section["max_length"], data_section["truncation"], report, seed)
             for s in sources]
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return dataset, report


def summarize(dataset: Any, report: SplitReport) -> None:
    report.rows = len(dataset)
    report.lengths = [len(ids) for ids in dataset["input_ids"]]
    report.tokens = sum(report.lengths)
    report.trained_tokens = sum(sum(1 for label in labels if label != IGNORE) for labels in dataset["labels"])


def prepare_data(data_section: dict, tokenizer, seed: int = 42) -> PreparedData:
    """Train (and eval) datasets of input_ids and labels, with a report of what was used, cut or left out."""
    tokenization = Tokenization.for_tokenizer(tokenizer, data_section["train_on"])
    train, train_report = prepare_split(data_section["train"], tokenization, data_section, seed)
    eval_dataset, eval_report = None, None
    if data_section.get("eval"):
        eval_dataset, eval_report = prepare_split(data_section["eval"], tokenization, data_section, seed)
    elif data_section.get("eval_fraction"):
        split = train.train_test_split(test_size=data_section["eval_fraction"], seed=seed)
        train, eval_dataset = split["train"], split["test"]
        eval_report = SplitReport(sources=[SourceReport(name=f"{data_section['eval_fraction']:.0%} of train",
                                                        format="-", rows=len(eval_dataset),
                                                        used_rows=len(eval_dataset), fingerprint="-")])
    if len(train) == 0:
        raise DataError("no training rows left after truncation and filtering; raise data.max_length")
    summarize(train, train_report)
    reports = {"train": train_report}
    if eval_dataset is not None:
        summarize(eval_dataset, eval_report)
        reports["eval"] = eval_report
    return PreparedData(train=train, eval=eval_dataset, reports=reports)
