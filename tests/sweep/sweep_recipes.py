"""Recipes with a sweep: section on the tiny models of conftest, for the sweep's tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import facts_rows, write_jsonl


def write_sweep_recipe(folder: Path, model: Path, sweep: str, *, steps: int = 4, eval_steps: int = 2,
                       training: str = "", name: str = "recipe.yaml") -> Path:
    """A recipe training `model` on the facts for `steps` steps, evaluated every `eval_steps`, its sweep folder
    folder/sweep, and the `sweep:` section given as YAML text (indented or not)."""
    data = folder / "facts.jsonl"
    if not data.exists():
        write_jsonl(data, facts_rows("messages"))
    recipe = folder / name
    recipe.write_text(
        f"model:\n  name_or_path: {model}\n"
        f"data:\n  train:\n    - path: {data}\n  max_length: 64\n  eval_fraction: 0.25\n"
        "lora:\n  r: 4\n  lora_alpha: 8\n"
        f"training:\n  output_dir: {folder / 'sweep'}\n  max_steps: {steps}\n  per_device_train_batch_size: 8\n"
        f"  learning_rate: 5.0e-3\n  warmup_steps: 0\n  logging_steps: 1\n  eval_steps: {eval_steps}\n"
        f"  save_strategy: \"no\"\n  seed: 0\n  disable_tqdm: true\n"
        + textwrap.indent(textwrap.dedent(training), "  ")
        + "sweep:\n" + textwrap.indent(textwrap.dedent(sweep).strip() + "\n", "  "),
        encoding="utf-8")
    return recipe


def line_of(recipe: Path, text: str) -> int:
    """The 1-based line of the recipe that holds `text`."""
    return next(n for n, line in enumerate(recipe.read_text().splitlines(), 1) if text in line)
