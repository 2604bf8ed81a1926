"""The inputs of a run, checked as the training command will load them: the output folder, the model config,
the tokenizer and the data (tokenized as training tokenizes it, with examples shown)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from lorakit.checks.findings import Findings
from lorakit.errors import LorakitError
from lorakit.recipe.sections import DataSection, Recipe, own_fields

# ---------------------------------------------------------------- what sft would refuse to write over


def check_output_dir(out: Path, findings: Findings) -> None:
    from lorakit.training import run_dir

    if not out.exists():
        return
    if not out.is_dir():
        findings.problem(f"training.output_dir: {out} is a file; choose another output folder")
        return
    if not [p for p in out.iterdir() if p.name != ".DS_Store"]:
        return
    record = run_dir.read_record(out)
    if record is None:
        findings.problem(f"training.output_dir: {out} is not empty and is not a lorakit run; lorakit sft never "
                         "writes over files it did not make. Choose another output folder")
    elif record.get("status") == run_dir.COMPLETED:
        findings.warning(f"training.output_dir: {out} already holds a finished run; lorakit sft will stop unless "
                         "given --overwrite (which replaces it) or another --output-dir")
    else:
        findings.warning(f"training.output_dir: {out} holds an unfinished run ({record.get('status')}); "
                         "lorakit sft will resume it when the recipe and data are unchanged")


# ---------------------------------------------------------------- model config and tokenizer


def unreachable(what: str, name: str, error: Exception) -> str:
    """Why `name` could not be loaded, saying whether the Hub was the reason."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    if Path(name).expanduser().exists():
        return f"{what}: cannot load {name}: {reason}"
    if os.environ.get("HF_HUB_OFFLINE") == "1" and isinstance(error, OSError):  # transformers' "not in the cache"
        return (f"{what}: {name} is not in the local Hugging Face cache, and the Hub is off (HF_HUB_OFFLINE=1), so "
                "it cannot be downloaded. Download it once with the Hub on, or point to a local folder")
    return f"{what}: could not fetch {name} from the Hugging Face Hub: {reason}"


def load_model_config(recipe: Recipe, findings: Findings, report_failure: bool = True) -> Any | None:
    """The model's config (its shape, for the memory estimate); a failure is reported unless the tokenizer's was."""
    from transformers import AutoConfig

    from lorakit.models.loading import reach_hub_or_cache

    name = recipe.model["name_or_path"]
    try:
        reach_hub_or_cache(recipe.model)  # an unreachable Hub: said at once, not after retries
    except LorakitError as error:
        if report_failure:
            findings.problem(str(error))
        return None
    try:
        config = AutoConfig.from_pretrained(name, revision=recipe.model.get("revision"),
                                            trust_remote_code=recipe.model.get("trust_remote_code", False))
    except Exception as error:  # transformers raises OSError, ValueError or a Hub error; all mean "cannot use it"
        if report_failure:
            findings.problem(unreachable("model.name_or_path", name, error))
        return None
    text = config.get_text_config()
    findings.ok(f"model config: {config.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
                f"vocabulary {text.vocab_size:,} (weights not loaded)")
    from lorakit.checks.modules import check_target_modules

    check_target_modules(recipe, config)  # targets that match nothing: a recipe error (exit 2), as for sft
    capped = cap_to_position_limit(recipe, config)
    if capped:
        (findings.ok if capped.startswith(DEFAULT_CAPPED) else findings.warning)(capped)
    return config


DEFAULT_CAPPED = "data.max_length: "


def cap_to_position_limit(recipe: Recipe, config: Any = None) -> str | None:
    """Lower data.max_length to the model's max_position_embeddings when it is longer, and say so (None when it
    fits, or the config cannot be read here: loading the model reports that). Positions past the limit are ones
    the model never learnt; some models (absolute position embeddings) cannot compute them at all."""
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(recipe.model["name_or_path"], revision=recipe.model.get("revision"),
                                                trust_remote_code=recipe.model.get("trust_remote_code", False))
        except Exception:  # unreadable here: the model's own loading says why, with its message
            return None
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    wanted = recipe.data.get("max_length")
    if not isinstance(limit, int) or not isinstance(wanted, int) or wanted <= limit:
        return None
    recipe.data["max_length"] = limit
    if wanted == own_fields(DataSection)["max_length"][1]:  # lorakit's default, not a length the recipe asked for
        return f"{DEFAULT_CAPPED}{limit} tokens, the model's max_position_embeddings (the default is {wanted})"
    return (f"data.max_length={wanted} is more than the model's max_position_embeddings={limit}: rows are cut at "
            f"{limit} tokens instead (data.truncation applies there); set data.max_length: {limit} or less to "
            "silence this")


def load_training_tokenizer(recipe: Recipe, findings: Findings) -> Any | None:
    from lorakit.models.loading import end_of_turn_token, load_tokenizer

    name = recipe.model["name_or_path"]
    try:
        tokenizer, source = load_tokenizer(recipe.model)
    except LorakitError as error:  # load_tokenizer's own message: what could not be loaded, and why
        findings.problem(str(error))
        return None
    except Exception as error:  # any other failure to load is the user's to fix too
        findings.problem(unreachable("model.name_or_path", name, error))
        return None
    end = end_of_turn_token(tokenizer)
    findings.ok(f"tokenizer: chat template from {source}; a reply ends with {end!r}; pad {tokenizer.pad_token!r}")
    return tokenizer


# ---------------------------------------------------------------- data


def prepare_training_data(recipe: Recipe, tokenizer, findings: Findings) -> Any | None:
    """The datasets sft would train on, with their report; without a tokenizer, whether each source loads."""
    from lorakit.errors import DataError
    from lorakit.data.sources import load_source
    from lorakit.data.pipeline import prepare_data

    click.secho("data", bold=True)
    if tokenizer is None:
        for source in recipe.data["train"] + (recipe.data.get("eval") or []):
            try:
                rows = len(load_source(source))
            except DataError as error:
                findings.problem(str(error))
            else:
                findings.ok(f"{source['path']}: {rows:,} rows (not tokenized: the tokenizer did not load)")
        return None
    with quiet_progress_bars():
        try:
            data = prepare_data(recipe.data, tokenizer, seed=recipe.training.get("seed", 42))
        except DataError as error:
            findings.problem(str(error))
            return None
    max_length = recipe.data["max_length"]
    for split, report in data.reports.items():
        stats = report.length_stats()
        click.echo(f"  {split}: {report.rows:,} rows, {report.tokens:,} tokens ({report.trained_tokens:,} trained)")
        for source in report.sources:
            click.echo(f"    {source.name}: {source.format}, {source.used_rows:,} of {source.rows:,} rows used")
        if stats:
            click.echo(f"    tokens per row: min {stats['min']}, median {stats['median']}, p95 {stats['p95']}, "
                       f"max {stats['max']} (data.max_length {max_length})")
        if report.truncated:
            findings.warning(f"{split}: {report.truncated:,} rows are longer than data.max_length={max_length} and "
                             "will be cut (their ends are not trained); raise max_length or set "
                             "data.truncation: drop")
        if report.dropped_too_long:
            findings.warning(f"{split}: {report.dropped_too_long:,} rows longer than data.max_length={max_length} "
                             "are left out (data.truncation: drop)")
        if report.dropped_no_trained_tokens:
            findings.warning(f"{split}: {report.dropped_no_trained_tokens:,} rows are left out: none of their "
                             f"tokens is trained within data.max_length={max_length}")
    return data


@contextmanager
def quiet_progress_bars():
    """datasets' progress bars off while validate prints its report, and back on after."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def show_examples(tokenizer, dataset, count: int, recipe: Recipe) -> None:
    from lorakit.data.labels import IGNORE
    from lorakit.data.render import legend, render_example

    count = min(count, len(dataset))
    if not count:
        return
    color = sys.stdout.isatty()
    click.secho(f"examples ({legend(color)}; data.train_on: {recipe.data['train_on']})", bold=True)
    for index in range(count):
        row = dataset[index]
        trained = sum(1 for label in row["labels"] if label != IGNORE)
        click.echo(f"  example {index + 1}: {len(row['input_ids'])} tokens, {trained} trained")
        text = render_example(tokenizer, row["input_ids"], row["labels"], color).rstrip("\n")
        click.echo("    " + text.replace("\n", "\n    "))
