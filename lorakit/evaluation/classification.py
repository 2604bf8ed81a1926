"""What `lorakit classify` and `lorakit eval` measure on a classifier: accuracy, macro and micro F1, per-class
precision/recall/F1 and the confusion matrix (multi_label: per label, with exact match); MSE, Pearson and Spearman
for regression. Plain numpy, from logits and labels.

`lorakit eval` on a classify run (or its merged folder) lands in `evaluate_classifier`: the run's eval data (or
--data), scored by the model and, with --compare-base, by the base with its untrained head and by the majority
class of the training data, side by side.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import click

from lorakit.errors import LorakitError
from lorakit.recipe.sections import CLASSIFY_METRICS

DEFAULT_METRIC = {"classification": "f1_macro", "multi_label": "f1_macro", "regression": "mse"}
LOWER_IS_BETTER = ("loss", "mse")
MAX_PRINTED_CLASSES = 20


# ---------------------------------------------------------------- metrics


def predictions(logits, kind: str):
    """Class ids (classification), 0/1 per label (multi_label, sigmoid >= 0.5) or the scores (regression)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    if kind == "classification":
        return logits.argmax(-1)
    if kind == "multi_label":
        return (logits >= 0).astype(np.int64)  # sigmoid(x) >= 0.5 exactly when x >= 0
    return logits.reshape(-1)


def per_class(true, predicted, names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class; 0 where a ratio has nothing to divide (as sklearn does)."""
    out = {}
    for index, name in enumerate(names):
        t, p = true[:, index], predicted[:, index]
        hits, predicted_count, support = int((t & p).sum()), int(p.sum()), int(t.sum())
        precision = hits / predicted_count if predicted_count else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def one_hot(ids, count: int):
    import numpy as np

    out = np.zeros((len(ids), count), dtype=np.int64)
    out[np.arange(len(ids)), ids] = 1
    return out


def classification_metrics(logits, labels, kind: str, names: list[str]) -> dict[str, Any]:
    """{'metrics': headline figures, 'per_class': ..., 'confusion_matrix': [[true x predicted]]} of one model."""
    import numpy as np

    labels = np.asarray(labels)
    predicted = predictions(logits, kind)
    if kind == "regression":
        return {"metrics": regression_metrics(predicted, labels.astype(np.float64).reshape(-1))}
    if kind == "classification":
        true_hot, predicted_hot = one_hot(labels.astype(np.int64), len(names)), one_hot(predicted, len(names))
    else:
        true_hot, predicted_hot = labels.astype(np.int64), predicted
    classes = per_class(true_hot, predicted_hot, names)
    # Macro F1 over the classes the data or the predictions have (sklearn's default): an absent class with no
    # predictions has no F1 to average.
    present = [name for i, name in enumerate(names) if true_hot[:, i].any() or predicted_hot[:, i].any()]
    hits, predicted_total, support = int((true_hot & predicted_hot).sum()), int(predicted_hot.sum()), int(true_hot.sum())
    micro_p = hits / predicted_total if predicted_total else 0.0
    micro_r = hits / support if support else 0.0
    metrics = {"f1_macro": mean([classes[name]["f1"] for name in present]),
               "f1_micro": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0,
               "loss": cross_entropy(logits, labels, kind)}
    out: dict[str, Any] = {"per_class": classes}
    if kind == "classification":
        metrics = {"accuracy": float((predicted == labels).mean()), **metrics}
        matrix = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(matrix, (labels.astype(np.int64), predicted), 1)
        out["confusion_matrix"] = matrix.tolist()
    else:
        metrics["exact_match"] = float((true_hot == predicted_hot).all(axis=1).mean())
    return {"metrics": metrics, **out}


def cross_entropy(logits, labels, kind: str) -> float:
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    if kind == "multi_label":  # binary cross-entropy per label, averaged
        return float(np.mean(np.logaddexp(0, logits) - labels * logits))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels.astype(np.int64)].mean())


def regression_metrics(predicted, true) -> dict[str, float]:
    import numpy as np

    error = predicted - true
    return {"mse": float(np.mean(error ** 2)), "mae": float(np.mean(np.abs(error))),
            "pearson": pearson(predicted, true), "spearman": pearson(ranks(predicted), ranks(true))}


def pearson(a, b) -> float:
    """Pearson correlation; nan when either side is constant (no correlation is defined)."""

    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / scale) if scale else math.nan


def ranks(values):
    """Ranks with ties sharing their average rank (what Spearman's correlation needs)."""
    import numpy as np

    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranked[order[start:end + 1]] = (start + end) / 2
        start = end + 1
    return ranked


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def trainer_metrics(kind: str, names: list[str]):
    """transformers.Trainer's compute_metrics: the headline figures of CLASSIFY_METRICS (logged as eval_<name>)."""
    wanted = CLASSIFY_METRICS[kind]

    def compute(eval_prediction) -> dict[str, float]:
        figures = classification_metrics(eval_prediction.predictions, eval_prediction.label_ids, kind, names)
        return {key: value for key, value in figures["metrics"].items() if key in wanted}

    return compute


def majority_logits(counts: dict[str, int], rows: int, names: list[str], eval_rows: int, kind: str):
    """The majority baseline as logits: the training data's class frequencies (multi_label: each label's), so
    every row gets the most common class and the loss is that of knowing the frequencies and nothing else."""
    import numpy as np

    frequency = np.array([counts.get(name, 0) for name in names], dtype=np.float64) / max(rows, 1)
    frequency = np.clip(frequency, 1e-6, 1 - 1e-6)  # a class absent from training would have log 0 = -inf
    row = np.log(frequency) - (np.log1p(-frequency) if kind == "multi_label" else 0)
    return np.tile(row, (eval_rows, 1))


# ---------------------------------------------------------------- lorakit eval on a classifier


def is_classifier(target) -> bool:
    """A classify run, or a model folder holding a sequence-classification model (a merged classify run)."""
    from lorakit.models.classifier import read_task

    if target.recipe is not None and target.recipe.command == "classify":
        return True
    return read_task(target.adapter_path or target.folder) is not None


def evaluate_classifier(target, report_path: Path | None, data: str | None, split: str | None, compare_base: bool,
                        batch_size: int, device: str | None, harness: str | None) -> dict:
    from lorakit.models.classifier import load_classifier_target, read_task
    from lorakit.models.loading import choose_placement

    if harness:
        raise LorakitError("--harness runs generation tasks; a classifier is scored on its labels: drop --harness")
    task = read_task(target.adapter_path or target.folder)
    if task is None:
        raise LorakitError(f"{target.name} has no {'lorakit_task.json'}: its labels are unknown; it is not a "
                           "finished `lorakit classify` run or its merged folder")
    tokenizer, rows, labels, description, notes = eval_rows(target, task, data, split)
    placement = choose_placement(target.model_section, device)
    click.echo(f"lorakit eval: {target.name} on {description}: {len(rows)} rows, {placement.device_name}, "
               f"{placement.dtype}")
    import torch

    from lorakit.models.classifier import predict_logits

    torch.manual_seed(0)  # the untrained head that --compare-base scores is this seed's
    model = load_classifier_target(target, placement, task)
    results = {"model": classification_metrics(predict_logits(model, tokenizer, rows, batch_size), labels,
                                               task["type"], task["labels"])}
    if compare_base and target.adapter_path is not None:
        with model.disable_adapter():  # the same base, with the head as it was before training
            results["base"] = classification_metrics(predict_logits(model, tokenizer, rows, batch_size), labels,
                                                     task["type"], task["labels"])
    elif compare_base:
        notes.append("a merged folder holds no untrained head: --compare-base shows the majority baseline only")
    counts, train_rows = train_counts(target)
    if compare_base and task["type"] != "regression" and counts:
        baseline = majority_logits(counts, train_rows, task["labels"], len(rows), task["type"])
        results["majority"] = classification_metrics(baseline, labels, task["type"], task["labels"])
    report = build_report(target, task, description, notes, results, placement, len(rows))
    print_report(report)
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        partial = report_path.with_name(report_path.name + ".partial")
        partial.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, report_path)  # whole or absent, never half written
        click.echo(f"lorakit: report written to {report_path}")
    return report


def eval_rows(target, task: dict, data: str | None, split: str | None):
    """(tokenizer, tokenized rows, label ids, description, notes): --data, else the run's own eval data."""
    from lorakit.data.classification import (
        LabelSpace,
        encode_label,
        prepare_classification_data,
        prepare_split,
    )
    from lorakit.models.classifier import load_classifier_tokenizer
    from lorakit.recipe.sections import DataSection, TaskSection, own_fields

    recipe = target.recipe
    tokenizer = load_classifier_tokenizer({"name_or_path": target.tokenizer_path,
                                           "trust_remote_code": target.model_section.get("trust_remote_code", False)})
    defaults = {key: default for key, (_, default) in own_fields(DataSection).items() if key not in ("train", "eval")}
    data_section = recipe.data if recipe is not None else defaults
    section = recipe.sections["task"] if recipe is not None else \
        {**{key: default for key, (_, default) in own_fields(TaskSection).items()}, **task}
    section = {**section, "bad_labels": "error", "labels": task["labels"]}
    seed = recipe.training.get("seed", 42) if recipe is not None else 42
    space = LabelSpace(task["type"], task["labels"])
    notes: list[str] = []
    if data:
        source = {"path": data, "split": split or "test", "name": None, "revision": None, "columns": {},
                  "fraction": None, "weight": None}
        columns, report, labels = prepare_split([source], section, task["labels"], data_section, tokenizer, seed)
        description = data if not split else f"{data} ({split})"
    elif recipe is not None and (data_section.get("eval") or data_section.get("eval_fraction")):
        prepared = prepare_classification_data(data_section, section, tokenizer, seed)
        columns, report = prepared.eval.to_dict(), prepared.reports["eval"]
        labels = [None] * len(prepared.eval)
        description = ", ".join(s["path"] for s in data_section["eval"]) if data_section.get("eval") else \
            f"the {data_section['eval_fraction']:.0%} of the training data held out in training (seed {seed})"
    else:
        raise LorakitError(f"{target.name}: no eval data: its recipe has neither data.eval nor data.eval_fraction; "
                           "pass --data PATH_OR_ID")
    ids = columns.pop("labels") if "labels" in columns else [encode_label(label, space) for label in labels]
    if report.truncated:
        notes.append(f"{report.truncated} rows were cut at data.max_length={data_section['max_length']} tokens")
    rows = [{key: columns[key][i] for key in columns} for i in range(len(ids))]
    if not rows:
        raise LorakitError(f"no rows to evaluate in {description}")
    return tokenizer, rows, ids, description, notes


def train_counts(target) -> tuple[dict[str, int] | None, int]:
    """(rows per label, rows) of the run's training data, from its run record: the majority baseline's."""
    from lorakit.training.run_dir import read_record

    folder = target.adapter_path
    if folder is None and target.folder is not None and (target.folder / "lorakit_merge.json").is_file():
        folder = Path(json.loads((target.folder / "lorakit_merge.json").read_text(encoding="utf-8"))["run_dir"])
    record = read_record(folder) if folder is not None and folder.is_dir() else None
    train = ((record or {}).get("data") or {}).get("train") or {}
    return train.get("label_counts"), train.get("rows", 0)


def build_report(target, task: dict, description: str, notes: list[str], results: dict, placement,
                 rows: int) -> dict:
    from lorakit.training.run_dir import library_versions

    clean = lambda value: None if isinstance(value, float) and math.isnan(value) else value
    return {
        "report": "lorakit eval",
        "target": target.name,
        "kind": "run (adapter)" if target.kind == "adapter" else "model",
        "base_model": target.base_name,
        "task": {"type": task["type"], "labels": task["labels"]},
        "data": {"description": description, "rows": rows, "notes": notes + target.notes},
        "settings": {"device": placement.device, "dtype": placement.dtype, "quantization": target.quantization},
        "metrics": {name: {k: clean(v) for k, v in figures["metrics"].items()} for name, figures in results.items()},
        "per_class": {name: figures["per_class"] for name, figures in results.items() if "per_class" in figures},
        "confusion_matrix": {"rows are": "true labels", "columns are": "predicted labels", "labels": task["labels"],
                             **{name: figures["confusion_matrix"] for name, figures in results.items()
                                if "confusion_matrix" in figures}},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
    }


def print_report(report: dict) -> None:
    metrics = report["metrics"]
    names = list(metrics)
    titles = {"model": "model", "base": "base (untrained head)", "majority": "majority class"}
    keys = [key for key in ("accuracy", "f1_macro", "f1_micro", "exact_match", "loss", "mse", "mae", "pearson",
                            "spearman") if any(key in metrics[name] for name in names)]
    table = [["", *[titles.get(name, name) for name in names]]]
    for key in keys:
        table.append([key, *[cell(metrics[name].get(key), key) for name in names]])
    click.echo("")
    echo_table(table)
    labels = report["task"]["labels"]
    if "model" in report["per_class"] and len(labels) <= MAX_PRINTED_CLASSES:
        classes = report["per_class"]["model"]
        click.echo("\n  per class (model)")
        echo_table([["", "precision", "recall", "F1", "support"]] +
                   [[name, f"{c['precision']:.1%}", f"{c['recall']:.1%}", f"{c['f1']:.1%}", str(c["support"])]
                    for name, c in classes.items()])
    matrix = report["confusion_matrix"].get("model")
    if matrix is not None and len(labels) <= MAX_PRINTED_CLASSES:
        click.echo("\n  confusion matrix (model): rows are the true labels, columns the predicted")
        echo_table([["", *labels]] + [[name, *map(str, row)] for name, row in zip(labels, matrix)])
    elif matrix is not None:
        click.echo(f"\n  {len(labels)} classes: per-class figures and the confusion matrix are in the report")
    for note in report["data"]["notes"]:
        click.echo(f"  note: {note}")
    click.echo("")


def cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if key in ("loss", "mse", "mae", "pearson", "spearman") else f"{value:.1%}"


def echo_table(table: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  " + "  ".join(text.ljust(widths[0]) if i == 0 else text.rjust(widths[i])
                                    for i, text in enumerate(line)))
