"""`lorakit validate`: everything `lorakit sft` does before its first training step, without loading weights.

recipe (checked exactly as sft checks it) -> model config and tokenizer -> data -> the trained tokens of real rows
-> the chat template saved with the adapter -> peak memory and steps. Each check runs even when an earlier one
found a problem, where it can, so one run lists everything to fix. Exit 0: the run can start; exit 1: it cannot,
every problem listed; exit 2: the recipe itself is invalid (the same message and code as `lorakit sft`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from lorakit.errors import LorakitError, ValidationFailed
from lorakit.recipe.sections import Recipe
from lorakit.recipe.load import load_recipe

OVERRIDES_HELP = "OVERRIDES are dotted recipe paths, e.g. training.learning_rate=1e-4 lora.r=8 data.max_length=512."
CHECKED_ROWS = 200  # rows of each training source whose trained tokens are checked one by one
TIGHT_FIT = 0.9  # an estimate above this share of the GPU's memory leaves no room for the estimate's error
GPU_SIZES_GIB = (16, 24, 40, 48, 80, 141)  # common cards, to say what an estimate fits on


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        click.secho(f"  problem  {indent(text, 11)}", fg="red")

    def warning(self, text: str) -> None:
        self.warnings.append(text)
        click.secho(f"  warning  {indent(text, 11)}", fg="yellow")

    @staticmethod
    def ok(text: str) -> None:
        click.echo(f"  ok       {indent(text, 11)}")


@click.command(epilog=OVERRIDES_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--samples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Training examples to show with their trained tokens marked.")
@click.option("--gpu-memory", metavar="SIZE",
              help="Memory of the GPU the run is for, e.g. 24GiB or 80GB: a problem when the estimate does not fit. "
                   "Default: this machine's GPU, if it has one.")
@click.option("--device", type=click.Choice(["auto", "cuda", "xla", "mps", "xpu", "cpu"]), default=None,
              help="Estimate memory for this device (default: the recipe's model.device; auto means a GPU).")
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="Processes the run will use, as for `lorakit sft`; same as launch.num_processes.")
@click.option("--accelerate-config", type=click.Path(dir_okay=False), default=None,
              help="accelerate config the run will use, as for `lorakit sft`; same as launch.accelerate_config.")
def command(recipe: str, overrides: tuple[str, ...], samples: int, gpu_memory: str | None, device: str | None,
            num_processes: int | None, accelerate_config: str | None) -> None:
    """Check RECIPE, its data, the tokens it trains and the memory it needs, before any training.

    Loads the model's config and tokenizer, never its weights.
    """
    if num_processes:
        overrides = (*overrides, f"launch.num_processes={num_processes}")
    if accelerate_config:
        overrides = (*overrides, f"launch.accelerate_config={Path(accelerate_config).absolute()}")
    limit = parse_gpu_memory(gpu_memory)
    findings = validate(recipe, overrides, samples=samples, gpu_memory=limit, device=device)
    if findings.problems:
        count = len(findings.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''}: the run cannot start as it stands:"]
        lines += [f"  - {indent(p, 4)}" for p in findings.problems]
        raise ValidationFailed("\n".join(lines))
    note = f" ({len(findings.warnings)} warning{'s' if len(findings.warnings) != 1 else ''} above)" \
        if findings.warnings else ""
    click.secho(f"lorakit validate: the run can start{note}: lorakit sft {recipe}", fg="green", bold=True)


def parse_gpu_memory(text: str | None) -> int | None:
    from lorakit.training.memory import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as error:
        raise LorakitError(f"--gpu-memory: {error}") from None


def validate(recipe_path: str, overrides: tuple[str, ...] = (), *, samples: int = 2, gpu_memory: int | None = None,
             device: str | None = None) -> Findings:
    """Run every check, print the report, and return what was found."""
    from lorakit.training.lifecycle import refuse_unsafe_settings

    recipe = load_recipe(recipe_path, overrides)  # RecipeError: exit 2 with sft's own message
    refuse_unsafe_settings(recipe)
    findings = Findings()
    click.secho(f"lorakit validate {recipe_path}", bold=True)
    findings.ok("recipe: valid (the checks lorakit sft makes)")
    check_output_dir(recipe.output_dir, findings)

    tokenizer = load_training_tokenizer(recipe, findings)
    config = load_model_config(recipe, findings, report_failure=tokenizer is not None)
    data = prepare_training_data(recipe, tokenizer, findings)
    if data is not None:
        show_examples(tokenizer, data.train, samples, recipe)
        check_trained_tokens(recipe, tokenizer, findings)
    if tokenizer is not None:
        check_saved_template(tokenizer, recipe, findings)
    check_memory(recipe, config, data, device, gpu_memory, findings)
    report_steps(recipe, data)
    return findings


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

    name = recipe.model["name_or_path"]
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
    return config


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


# ---------------------------------------------------------------- the trained tokens of real rows


@dataclass
class TokenIssue:
    """One kind of masking mistake, counted over the checked rows, with the first row that shows it."""

    rows: int = 0
    first: str = ""
    detail: str = ""

    def add(self, where: str, detail: str = "") -> None:
        if not self.rows:
            self.first, self.detail = where, detail
        self.rows += 1


@dataclass
class RowCheck:
    """What is wrong with the trained tokens of one row (all None/False: nothing)."""

    end_of_turn: str | None = None  # "absent": not after the reply at all; "present": there but not trained
    mapped: bool = False  # its tokens could be placed in its messages' text, so the prompt checks ran
    trained_prompt: str | None = None  # the text of prompt tokens that are trained
    untrained_reply: bool = False


def check_row(tokenizer, example: dict, ids: list[int], labels: list[int], stops: tuple[int, ...],
              train_on: str) -> RowCheck:
    """Check one encoded row: `ids` and `labels` as training sees them, `stops` the end-of-turn token ids."""
    from lorakit.data.labels import IGNORE

    check = RowCheck()
    spans = message_spans(tokenizer, example["messages"], ids) if "messages" in example else None
    replies = [(first, end) for role, first, end in spans or () if role == "assistant"]
    if replies:
        # Each reply's end is the first end-of-turn token between it and the next reply; it must be trained.
        bounds = [first for first, _ in replies[1:]] + [len(ids)]
        ends = [next((q for q in range(end, bound) if ids[q] in stops), None)
                for (_, end), bound in zip(replies, bounds)]
        if None in ends:
            check.end_of_turn = "absent"
        elif any(labels[q] == IGNORE for q in ends):
            check.end_of_turn = "present"
    else:  # text, prompt/completion, or a conversation that could not be mapped: count trained stops per reply
        turns = sum(m["role"] == "assistant" for m in example["messages"]) if "messages" in example else 1
        if sum(1 for i, label in zip(ids, labels) if label != IGNORE and i in stops) < turns:
            check.end_of_turn = "present" if any(i in stops for i in ids) else "absent"
    if spans is None or train_on != "completions":
        return check
    check.mapped = True
    prompt = set(range(replies[0][0]) if replies else ())
    prompt = prompt.union(*(range(first, end) for role, first, end in spans if role != "assistant"))
    wrong = sorted(p for p in prompt if labels[p] != IGNORE)
    if wrong:
        check.trained_prompt = tokenizer.decode([ids[p] for p in wrong[:24]], skip_special_tokens=False)
    check.untrained_reply = any(labels[p] == IGNORE for first, end in replies for p in range(first, end))
    return check


def check_trained_tokens(recipe: Recipe, tokenizer, findings: Findings) -> None:
    """Encode the first rows of each training source as sft does and check which tokens carry a label.

    - every assistant reply ends with a trained end-of-turn token (otherwise the model never learns to stop);
    - with train_on: completions, no token of a system or user message, nor any text before the first reply,
      is trained; and every token of every assistant reply is.
    """
    from lorakit.data.labels import Tokenization
    from lorakit.models.loading import end_of_turn_token

    click.secho("trained tokens", bold=True)
    train_on = recipe.data["train_on"]
    tokenization = Tokenization.for_tokenizer(tokenizer, train_on)
    end = end_of_turn_token(tokenizer) or tokenizer.eos_token
    no_stop, prompt_trained, reply_untrained = TokenIssue(), TokenIssue(), TokenIssue()
    checked = mapped = 0
    with quiet_progress_bars():
        for source in recipe.data["train"]:
            for row, example in first_examples(source, CHECKED_ROWS):
                ids, labels = tokenization.encode(example)
                if len(ids) > recipe.data["max_length"]:
                    continue  # cut by truncation: its end is not trained by design, and is counted as truncated
                where = f"{source['path']} row {row}"
                check = check_row(tokenizer, example, ids, labels, tokenization.stop_ids, train_on)
                checked += 1
                mapped += check.mapped
                if check.end_of_turn:
                    no_stop.add(where, check.end_of_turn)
                if check.trained_prompt:
                    prompt_trained.add(where, check.trained_prompt)
                if check.untrained_reply:
                    reply_untrained.add(where)
    if not checked:
        findings.warning("no row could be checked: every checked row is longer than data.max_length")
        return
    scope = f"{checked} rows checked, at most the first {CHECKED_ROWS} of each training source"
    if no_stop.rows:
        why = ("it follows the reply but is masked" if no_stop.detail == "present"
               else "the chat template does not put it after the reply at all")
        findings.problem(f"the end-of-turn token {end!r} is not trained at the end of every assistant reply in "
                         f"{no_stop.rows} of {checked} rows (first: {no_stop.first}): {why}. The model would never "
                         "learn to stop. Use a chat template that closes every assistant turn with the end-of-turn "
                         "or EOS token (model.chat_template: chatml ships with lorakit)")
    else:
        findings.ok(f"{end!r} is trained at the end of every assistant reply ({scope})")
    if recipe.data["train_on"] != "completions":
        return
    if not mapped:
        findings.warning("cannot map tokens back to message text with this tokenizer (no offsets, or the chat "
                         "template rewrites the text); which tokens of user and system messages are trained was "
                         "not checked")
        return
    template_hint = ("The chat template renders a conversation differently once a reply follows (compare its "
                     "output with and without add_generation_prompt), so lorakit cannot tell where the reply "
                     "starts; use a template that renders the turns before a reply the same way in both")
    if prompt_trained.rows:
        findings.problem(f"tokens before the assistant reply are trained in {prompt_trained.rows} of {mapped} rows, "
                         f"though data.train_on is completions (first: {prompt_trained.first}: "
                         f"{prompt_trained.detail!r}). {template_hint}")
    else:
        findings.ok(f"no token of a system or user message is trained ({mapped} rows mapped to their text)")
    if reply_untrained.rows:
        findings.problem(f"the assistant reply is not entirely trained in {reply_untrained.rows} of {mapped} rows "
                         f"(first: {reply_untrained.first}). {template_hint}")


def first_examples(source: dict, limit: int) -> list[tuple[int, dict]]:
    """(row number, example) for the first `limit` rows of a source, mapped to messages/prompt/text as sft maps them."""
    from lorakit.data.sources import detect_format, load_source
    from lorakit.data.formats import row_to_example

    dataset = load_source(source)
    renames = {src: dst for dst, src in (source.get("columns") or {}).items()}
    if renames:
        dataset = dataset.rename_columns(renames)
    fmt = source.get("format") or detect_format(dataset.column_names, source["path"])
    examples = []
    for index in range(min(limit, len(dataset))):
        try:
            examples.append((index + 1, row_to_example(dataset[index], fmt)))
        except ValueError:
            continue  # an unusable row stops prepare_data first; it is never trained
    return examples


def message_spans(tokenizer, messages: list[dict], ids: list[int]) -> list[tuple[str, int, int]] | None:
    """(role, first, end) token positions lying wholly inside each message's text; None when not mappable.

    The chat template's text is tokenized with character offsets. apply_chat_template tokenizes that same text,
    which is checked (same token ids) before any position is trusted. A message whose text the template
    rewrites cannot be placed and is left out.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(ids):
        return None
    offsets = encoded["offset_mapping"]
    spans, cursor = [], 0
    for message in messages:
        content = message["content"]
        start = text.find(content, cursor) if content.strip() else -1
        if start < 0:
            continue
        end = start + len(content)
        cursor = end
        inside = [p for p, (a, b) in enumerate(offsets) if start <= a and b <= end and b > a]
        if inside:
            spans.append((message["role"], inside[0], inside[-1] + 1))
    return spans


# ---------------------------------------------------------------- the chat template inference will use


def check_saved_template(tokenizer, recipe: Recipe, findings: Findings) -> None:
    """Save the tokenizer as sft saves it with the adapter, load it back, and compare the chat template."""
    from transformers import AutoTokenizer

    click.secho("chat template", bold=True)
    conversation = [{"role": "user", "content": "Is the template saved?"}]
    with tempfile.TemporaryDirectory(prefix="lorakit-validate-") as folder:
        tokenizer.save_pretrained(folder)
        saved = AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.model.get("trust_remote_code", False))
    used_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    saved_ids = saved.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True) \
        if saved.chat_template else None
    if saved.chat_template != tokenizer.chat_template or _ids(saved_ids) != _ids(used_ids):
        findings.problem("the chat template saved with the tokenizer (what inference will load from the output "
                         "folder) differs from the one used for training; prompts at inference would not match "
                         "training. Set model.chat_template explicitly (a name, a .jinja file or a Jinja string)")
    else:
        findings.ok("the chat template saved with the adapter is the one training uses, so inference prompts "
                    "match training")


def _ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    return list(value["input_ids"] if hasattr(value, "keys") else value)


# ---------------------------------------------------------------- memory and steps


def check_memory(recipe: Recipe, config, data, device: str | None, gpu_memory: int | None,
                 findings: Findings) -> None:
    from lorakit.training.memory import GIB, estimate_recipe_memory, format_size

    device = device or recipe.model.get("device", "auto")
    if recipe.training.get("use_cpu"):
        device = "cpu"
    click.secho("memory (estimate)", bold=True)
    if config is None:
        click.echo("  not estimated: the model's config did not load")
        return
    longest = max((r.length_stats().get("max", 0) for r in data.reports.values()), default=None) if data else None
    try:
        estimate, setup = estimate_recipe_memory(recipe, config, "cpu" if device == "cpu" else "cuda", longest)
    except ValueError as error:  # peft refusing the recipe's LoRA for this model (a target it does not have, ...)
        findings.problem(f"lora: peft cannot apply this LoRA to {recipe.model['name_or_path']}: "
                         f"{str(error).strip().splitlines()[0]}")
        return
    except Exception as error:  # a model transformers cannot build from its config alone: say so, go on
        findings.warning(f"memory not estimated: {type(error).__name__}: {str(error).strip()[:300]}")
        return
    where = "CPU RAM" if setup.device == "cpu" else "each GPU" if setup.processes > 1 else "one GPU"
    quant = {"4bit": "QLoRA 4-bit", "8bit": "LoRA on 8-bit weights"}.get(setup.quantization, "LoRA")
    sharded = {"all": " sharding weights and LoRA state (FSDP, ZeRO-3)",
               "states": " sharding LoRA state (ZeRO-2)"}.get(setup.sharding, "")
    sharded = f", {setup.processes} processes{sharded}" if setup.processes > 1 else ""
    click.echo(f"  peak on {where}: {quant}, {setup.dtype}, micro-batch {setup.micro_batch} x {setup.seq_len} tokens, "
               f"activation checkpointing {'on' if setup.gradient_checkpointing else 'off'}{sharded}")
    for label, size in estimate.parts():
        if size:
            click.echo(f"    {label:<32} {format_size(size):>10}")
    click.echo(f"    {'total':<32} {format_size(estimate.total):>10}")
    if setup.device == "cpu":
        return
    if gpu_memory is None:
        gpu_memory = local_gpu_memory()
    if gpu_memory is None:
        fits = [f"{size} GiB" for size in GPU_SIZES_GIB if estimate.total <= TIGHT_FIT * size * GIB]
        click.echo(f"  fits GPUs of {', '.join(fits) if fits else 'none of the common sizes (up to 141 GiB)'}; "
                   "--gpu-memory SIZE checks a given card")
        return
    limit = format_size(gpu_memory)
    if estimate.total > gpu_memory:
        findings.problem(f"memory: the estimated peak, {format_size(estimate.total)}, does not fit in {limit} of GPU "
                         f"memory. Lower training.per_device_train_batch_size (and raise gradient_accumulation_steps "
                         f"to keep the batch) or data.max_length{advice(setup)}")
    elif estimate.total > TIGHT_FIT * gpu_memory:
        findings.warning(f"memory: the estimated peak, {format_size(estimate.total)}, is within 10% of {limit}; the "
                         "estimate's own error could make the run run out of memory")
    else:
        findings.ok(f"memory: the estimated peak, {format_size(estimate.total)}, fits in {limit}")


def advice(setup) -> str:
    more = []
    if not setup.gradient_checkpointing:
        more.append("turn on training.activation_checkpointing")
    if setup.quantization is None:
        more.append("use QLoRA (quantization: {load_in_4bit: true})")
    return "; or " + " or ".join(more) if more else ""


def local_gpu_memory() -> int | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def report_steps(recipe: Recipe, data) -> None:
    from lorakit.training.memory import estimate_steps, read_launch, training_setup

    training = recipe.training
    if data is None:
        if training.get("max_steps", -1) > 0:
            click.echo(f"steps: {training['max_steps']} optimizer steps (training.max_steps)")
        else:
            click.echo("steps: not counted: the data did not load")
        return
    launch = read_launch(recipe)
    setup, packing = training_setup(recipe, "cuda", launch)
    accumulation = training.get("gradient_accumulation_steps") or 1
    report = data.reports["train"]
    steps = estimate_steps(rows=report.rows, tokens=report.tokens, micro_batch=setup.micro_batch,
                           gradient_accumulation=accumulation, processes=launch.processes,
                           epochs=training.get("num_train_epochs", 1), max_steps=training.get("max_steps", -1),
                           packing=packing, max_length=recipe.data["max_length"])
    if training.get("max_steps", -1) > 0:
        click.echo(f"steps: {steps:,} optimizer steps (training.max_steps)")
        return
    # Packed sequences are never quite full, so with packing the count is a lower bound.
    rows = (f"{report.tokens:,} tokens packed into sequences of up to {recipe.data['max_length']}" if packing
            else f"{report.rows:,} rows")
    click.echo(f"steps: {'about ' if packing else ''}{steps:,} optimizer steps ({rows}, {setup.micro_batch} per "
               f"device x {accumulation} accumulation x {launch.processes} process(es), "
               f"{training.get('num_train_epochs', 1):g} epoch(s))")


def indent(text: str, width: int) -> str:
    return text.replace("\n", "\n" + " " * width)
