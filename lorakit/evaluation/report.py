"""What `lorakit eval` prints: the table of metrics (beside the base model's), the notes, and a few samples."""

from __future__ import annotations

import math
from typing import Any

import click

SAMPLES_SHOWN = 3
# How each metric is shown: (title, format); chrf and bleu are sacrebleu's 0-100 scores.
ROWS = {"loss": ("loss", "{:.4f}"), "perplexity": ("perplexity", "{:.2f}"), "exact_match": ("exact match", "{:.1%}"),
        "token_f1": ("token F1", "{:.1%}"), "rouge_l": ("ROUGE-L", "{:.1%}"), "chrf": ("chrF", "{:.1f}"),
        "bleu": ("BLEU", "{:.1f}")}
SHARES = ("exact_match", "token_f1", "rouge_l")  # 0-1 scores, whose change is told in points


def print_report(report: dict) -> None:
    metrics = report["metrics"]
    names = list(metrics)
    chosen = report["settings"].get("metrics") or ["exact_match", "token_f1"]
    rows = [(*ROWS[key][:1], key, ROWS[key][1]) for key in ("loss", "perplexity", *chosen)]
    # The column the model is compared with: the base, or the start point (the SFT model of a DPO run).
    other = next((name for name in names if name != "model"), None)
    header = ["", *names] + (["change"] if other else [])
    table = [header]
    for title, key, form in rows:
        values = [metrics[name].get(key) for name in names]
        line = [title] + [show(value, form) for value in values]
        if other:
            line.append(show_change(metrics["model"].get(key), metrics[other].get(key), key))
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    click.echo("")
    for line in table:
        click.echo("  " + "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                    for i, cell in enumerate(line)))
    for note in report["data"]["notes"]:
        click.echo(f"  note: {note}")
    for number, example in enumerate(report["examples"][:SAMPLES_SHOWN], 1):
        click.echo(f"\n  sample {number}")
        click.echo(f"    prompt     {shorten_prompt(example['prompt'])}")
        click.echo(f"    reference  {one_line(example['reference'])}")
        click.echo(f"    model      {one_line(example['prediction'])}")
        if f"{other}_prediction" in example:
            click.echo(f"    {other:<9}  {one_line(example[f'{other}_prediction'])}")
    click.echo("")


def show(value: Any, form: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return form.format(value)


def show_change(model: float | None, base: float | None, key: str) -> str:
    if model is None or base is None or math.isnan(model) or math.isnan(base) or key == "perplexity":
        return ""
    if key in SHARES:
        return f"{100 * (model - base):+.1f} pts"
    if key in ("chrf", "bleu"):
        return f"{model - base:+.1f}"
    return f"{model - base:+.4f}"


def one_line(text: str, limit: int = 100) -> str:
    flat = printable(text)
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def shorten_prompt(prompt: str, limit: int = 100) -> str:
    """The end of the prompt, where the question is."""
    flat = printable(prompt)
    return flat if len(flat) <= limit else "..." + flat[-(limit - 3):]


def printable(text: str) -> str:
    """Newlines and control characters escaped, so a reply shows on one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else "\\n" if c == "\n" else f"\\x{ord(c):02x}" for c in text)
