"""`lorakit predict`: label every row of a data file with a trained classifier (a `lorakit classify` run or its
merged folder), with the probability of each label, into a JSON Lines or CSV file."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import click

from lorakit.errors import LorakitError, OutputDirError


@click.command()
@click.argument("target")
@click.option("--data", "data_path", required=True, metavar="PATH_OR_ID",
              help="Rows to label: a local file (json, jsonl, csv, parquet, arrow) or folder, or a Hub dataset id, "
                   "with the run's text column (and text pair column); a label column is not needed.")
@click.option("--split", help="Split of a Hub dataset (default: test).")
@click.option("--output", type=click.Path(dir_okay=False),
              help="File to write: .jsonl (default) or .csv (default: predictions-<data name>.jsonl in TARGET).")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Rows scored together.")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "xpu", "cpu"]), default=None,
              help="Force a device (default: the recipe's model.device, auto).")
def command(target: str, data_path: str, split: str | None, output: str | None, overwrite: bool, batch_size: int,
            device: str | None) -> None:
    """Label the rows of --data with TARGET, a classify run folder or its merged folder.

    Each output row holds the row number, the text, the predicted label and its probability, and the probability
    of every label (multi_label: the labels at 0.5 or above; regression: the predicted number).
    """
    run_predict(target, data_path, split=split, output=output, overwrite=overwrite, batch_size=batch_size,
                device=device)


def run_predict(target_name: str, data: str, *, split: str | None = None, output: str | None = None,
                overwrite: bool = False, batch_size: int = 32, device: str | None = None) -> Path:
    from lorakit.data.classification import check_texts, read_source
    from lorakit.models.classifier import (
        encode_texts,
        load_classifier_target,
        load_classifier_tokenizer,
        predict_logits,
        read_task,
    )
    from lorakit.models.inference import resolve_target
    from lorakit.models.loading import choose_placement, quiet_upstream_logs

    quiet_upstream_logs()
    target = resolve_target(target_name)
    task = read_task(target.adapter_path or target.folder)
    if task is None:
        raise LorakitError(f"{target_name} is not a classifier: it holds no lorakit_task.json (a finished "
                           "`lorakit classify` run or its merged folder has one); for text generation use "
                           "`lorakit generate`")
    path = output_path(target, data, output, overwrite)
    source = {"path": data, "split": split or "test", "name": None, "revision": None, "columns": {},
              "fraction": None, "weight": None}
    rows = read_source(source, task, need_labels=False)
    check_texts(rows, task)
    max_length = target.recipe.data["max_length"] if target.recipe is not None else 2048
    tokenizer = load_classifier_tokenizer({"name_or_path": target.tokenizer_path,
                                           "trust_remote_code": target.model_section.get("trust_remote_code", False)})
    placement = choose_placement(target.model_section, device)
    click.echo(f"lorakit predict: {target_name} on {data}: {len(rows.texts)} rows, {placement.device_name}")
    model = load_classifier_target(target, placement, task)
    encoded = encode_texts(tokenizer, rows.texts, rows.pairs, max_length)

    def progress(done: int, total: int) -> None:
        click.echo(f"\r  scored {done}/{total}", nl=False, err=True)

    logits = predict_logits(model, tokenizer, encoded, batch_size, on_batch=progress)
    click.echo("", err=True)
    records = [prediction_row(task, number, text, pair, row_logits)
               for number, text, pair, row_logits in zip(rows.numbers, rows.texts, rows.pairs or [None] * len(rows.texts),
                                                         logits)]
    write_rows(path, records, task)
    click.echo(f"lorakit: {len(records)} predictions written to {path}")
    return path


def output_path(target, data: str, output: str | None, overwrite: bool) -> Path:
    if output:
        path = Path(output)
    elif target.folder is not None:
        path = target.folder / f"predictions-{Path(data).stem or 'data'}.jsonl"
    else:
        raise LorakitError("--output is needed: TARGET is a Hub id, with no folder to write into")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise LorakitError(f"--output {path}: write .jsonl or .csv")
    if path.is_dir():
        raise OutputDirError(f"--output {path} is a folder; give a file name such as {path / 'predictions.jsonl'}")
    if path.exists() and not overwrite:
        raise OutputDirError(f"{path} already exists; nothing was changed. Add --overwrite, or choose another "
                             "--output")
    return path


def prediction_row(task: dict, number: int, text: str, pair: str | None, logits) -> dict[str, Any]:
    row: dict[str, Any] = {"row": number, task["text_column"]: text}
    if pair is not None:
        row[task["text_pair_column"]] = pair
    names = task["labels"]
    if task["type"] == "regression":
        row["prediction"] = float(logits[0])
        return row
    if task["type"] == "multi_label":
        probabilities = logits.sigmoid().tolist()
        row["labels"] = [name for name, p in zip(names, probabilities) if p >= 0.5]
    else:
        probabilities = logits.softmax(-1).tolist()
        best = max(range(len(names)), key=lambda i: probabilities[i])
        row.update(label=names[best], score=probabilities[best])
    row["probabilities"] = dict(zip(names, probabilities))
    return row


def write_rows(path: Path, records: list[dict], task: dict) -> None:
    """The whole file or nothing: written beside the destination and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8", newline="") as handle:
        if path.suffix.lower() == ".jsonl":
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            flat = [flatten(record) for record in records]
            writer = csv.DictWriter(handle, fieldnames=list(flat[0]) if flat else ["row"])
            writer.writeheader()
            writer.writerows(flat)
    os.replace(partial, path)


def flatten(record: dict) -> dict:
    """A CSV row: the probabilities as p_<label> columns, multi-label labels joined with '|'."""
    out = {key: value for key, value in record.items() if key not in ("probabilities", "labels")}
    if "labels" in record:
        out["labels"] = "|".join(record["labels"])
    for name, probability in (record.get("probabilities") or {}).items():
        out[f"p_{name}"] = probability
    return out
