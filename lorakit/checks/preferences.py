"""What `lorakit validate` checks on a DPO recipe, before any weight is loaded: the start point and its reference,
the tokenizer and chat template, the pairs as `lorakit dpo` tokenizes them (shown with their scored tokens
marked), that every scored response ends with its end-of-turn token, and the memory and steps of a run."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import click

from lorakit.checks.findings import Findings
from lorakit.checks.inputs import load_model_config, load_training_tokenizer, quiet_progress_bars
from lorakit.checks.memory import check_memory
from lorakit.errors import LorakitError
from lorakit.recipe.sections import Recipe

CHECKED_PAIRS = 200  # pairs of the training split whose scored tokens are checked one by one


def check_dpo_run(recipe: Recipe, findings: Findings, *, samples: int, gpu_memory: int | None,
                  device: str | None) -> None:
    from lorakit.checks.labels import check_saved_template
    from lorakit.models.preference_model import resolve_start

    try:
        start = resolve_start(recipe.model, recipe.sections["preference"])
    except LorakitError as error:
        findings.problem(str(error))
        return
    for key, value in start.summary_rows():
        findings.ok(f"{key}: {value}")
    # Everything below reads the base the run loads (for an SFT run folder, the base that run trained).
    as_loaded = dataclasses.replace(recipe, model=start.base)
    tokenizer = load_training_tokenizer(as_loaded, findings)
    config = load_model_config(as_loaded, findings, report_failure=tokenizer is not None)
    pairs = prepare_training_pairs(recipe, tokenizer, findings) if tokenizer is not None else None
    if pairs is not None:
        show_pairs(tokenizer, pairs.train, samples)
        check_scored_ends(tokenizer, pairs.train, recipe, findings)
    if tokenizer is not None:
        check_saved_template(tokenizer, as_loaded, findings)
    check_memory(as_loaded, config, pairs, device, gpu_memory, findings)  # a DPO step: lorakit.training.memory
    report_pair_steps(recipe, pairs)


def prepare_training_pairs(recipe: Recipe, tokenizer, findings: Findings) -> Any | None:
    from lorakit.data.preferences import prepare_pairs
    from lorakit.errors import DataError

    click.secho("preference pairs", bold=True)
    with quiet_progress_bars():
        try:
            pairs = prepare_pairs(recipe.data, tokenizer, recipe.sections["preference"]["on_bad_rows"],
                                  recipe.training.get("seed", 42))
        except DataError as error:
            findings.problem(str(error))
            return None
    max_length = recipe.data["max_length"]
    for split, report in pairs.reports.items():
        stats = report.length_stats()
        click.echo(f"  {split}: {report.rows:,} pairs, {report.tokens:,} tokens ({report.trained_tokens:,} scored)")
        for source in report.sources:
            click.echo(f"    {source.name}: {source.format}, {source.used_rows:,} of {source.rows:,} rows used")
        if stats:
            click.echo(f"    tokens per pair (prompt + the longer response): min {stats['min']}, median "
                       f"{stats['median']}, max {stats['max']} (data.max_length {max_length})")
        for reason, count in report.dropped_bad_rows.items():
            findings.warning(f"{split}: {count:,} rows left out ({reason}; preference.on_bad_rows: drop)")
        if report.truncated:
            findings.warning(f"{split}: {report.truncated:,} pairs are longer than data.max_length={max_length}; "
                             "their responses will be cut (and not end with their end-of-turn token)")
        if report.dropped_too_long:
            findings.warning(f"{split}: {report.dropped_too_long:,} pairs longer than data.max_length are left out")
        if report.dropped_no_trained_tokens:
            findings.warning(f"{split}: {report.dropped_no_trained_tokens:,} pairs are left out: their prompt alone "
                             f"fills data.max_length={max_length}")
    return pairs


def show_pairs(tokenizer, dataset, count: int) -> None:
    """The first pairs as the model sees them: prompt + chosen and prompt + rejected, the scored tokens marked."""
    from lorakit.data.labels import IGNORE
    from lorakit.data.render import legend, render_example

    color = sys.stdout.isatty()
    count = min(count, len(dataset))
    if count:
        click.secho(f"pairs ({legend(color).replace('trained', 'scored')}: each response with its end-of-turn "
                    "token; the prompt is not scored)", bold=True)
    for index in range(count):
        pair = dataset[index]
        click.echo(f"  pair {index + 1}: prompt {len(pair['prompt_ids'])} tokens, chosen {len(pair['chosen_ids'])}, "
                   f"rejected {len(pair['rejected_ids'])} scored")
        for side in ("chosen", "rejected"):
            response = pair[f"{side}_ids"]
            text = render_example(tokenizer, pair["prompt_ids"] + response,
                                  [IGNORE] * len(pair["prompt_ids"]) + response, color).rstrip("\n")
            click.echo(f"    {side}:\n      " + text.replace("\n", "\n      "))


def check_scored_ends(tokenizer, dataset, recipe: Recipe, findings: Findings) -> None:
    """Every scored response (not cut by max_length) ends with the end-of-turn token, or DPO never scores stopping."""
    from lorakit.data.labels import Tokenization
    from lorakit.models.loading import end_of_turn_token

    stops = Tokenization.for_tokenizer(tokenizer, "completions").stop_ids
    end = end_of_turn_token(tokenizer) or tokenizer.eos_token
    max_length = recipe.data["max_length"]
    checked = missing = 0
    first = None
    for index in range(min(CHECKED_PAIRS, len(dataset))):
        pair = dataset[index]
        for side in ("chosen_ids", "rejected_ids"):
            response = pair[side]
            if len(pair["prompt_ids"]) + len(response) >= max_length:
                continue  # cut by truncation: its end is not scored by design, and is counted as truncated
            checked += 1
            if not response or response[-1] not in stops:
                missing += 1
                first = first or f"pair {index + 1} ({side.removesuffix('_ids')})"
    if missing:
        findings.problem(f"{missing} of {checked} responses do not end with a scored end-of-turn token {end!r} "
                         f"(first: {first}), so DPO would not teach where a reply stops. Use a chat template that "
                         "closes every assistant turn with the end-of-turn or EOS token (model.chat_template: chatml)")
    elif checked:
        findings.ok(f"{end!r} is scored at the end of every response ({checked} responses of the first "
                    f"{min(CHECKED_PAIRS, len(dataset))} pairs); no prompt token is scored")


def step_rows(recipe: Recipe) -> int:
    return recipe.training.get("per_device_train_batch_size") or 8


def report_pair_steps(recipe: Recipe, pairs) -> None:
    training = recipe.training
    if training.get("max_steps", -1) > 0:
        click.echo(f"steps: {training['max_steps']:,} optimizer steps (training.max_steps)")
        return
    if pairs is None:
        click.echo("steps: not counted: the pairs did not load")
        return
    from lorakit.training.memory import read_launch

    processes = read_launch(recipe).processes
    accumulation = training.get("gradient_accumulation_steps") or 1
    per_epoch = max(1, math.ceil(pairs.reports["train"].rows / (step_rows(recipe) * processes)) // accumulation)
    epochs = training.get("num_train_epochs", 1)
    click.echo(f"steps: {math.ceil(per_epoch * epochs):,} optimizer steps ({pairs.reports['train'].rows:,} pairs, "
               f"{step_rows(recipe)} per device x {accumulation} accumulation x {processes} process(es), "
               f"{epochs:g} epoch(s))")
