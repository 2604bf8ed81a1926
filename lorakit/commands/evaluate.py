"""`lorakit eval`: loss and perplexity on the trained tokens, exact match and token F1 on greedy replies.

The eval data goes through the same tokenization as training (lorakit.data), so the loss is over exactly the
tokens a run was trained on. Each row's last trained span (the last assistant turn, the completion, the alpaca
output) is also its reference reply: the model answers the tokens before it, greedily, and the answer is scored
against it. Rows without such a span (plain text) count for the loss only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from lorakit.errors import LorakitError, OutputDirError

REPORT_FILE = "lorakit_eval.json"
REPORT_MARK = "lorakit eval"


@click.command()
@click.argument("target")
@click.option("--data", "data_path", metavar="PATH_OR_ID",
              help="Eval data: a local file or folder, or a Hub dataset id (default: the recipe's data.eval, else "
                   "the share of training data it held out with data.eval_fraction).")
@click.option("--split", help="Split of a Hub dataset given with --data (default: test).")
@click.option("--compare-base", is_flag=True, help="Also score the base model, side by side, to show what the "
                                                   "fine-tune changed.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Longest reply generated per prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompts generated (and rows scored) together.")
@click.option("--output", type=click.Path(dir_okay=False),
              help=f"JSON report to write (default: {REPORT_FILE} in the run or model folder).")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "xpu", "cpu"]), default=None,
              help="Force a device (default: the recipe's model.device, auto).")
@click.option("--metrics", metavar="NAMES",
              help="Comma-separated reply metrics: exact_match, token_f1, rouge_l, chrf, bleu (default: the recipe's "
                   "evaluation.metrics, else exact_match,token_f1). See docs/eval.md for which suits which task.")
@click.option("--harness", metavar="TASKS",
              help="Also run these comma-separated lm-evaluation-harness tasks on the model "
                   "(needs `pip install lm-eval` and, for most tasks, the Hub).")
def command(target: str, data_path: str | None, split: str | None, compare_base: bool, max_new_tokens: int,
            batch_size: int, output: str | None, device: str | None, metrics: str | None, harness: str | None) -> None:
    """Score TARGET on eval data: a run folder, a merged model folder, a Hub model id, or a recipe.

    Reports loss and perplexity on the completion tokens (as trained), and exact match and token F1 (or the
    --metrics chosen: ROUGE-L, chrF, BLEU) of greedy replies against the references, then writes a JSON report
    and prints a table with a few samples.
    """
    names = [name.strip() for name in metrics.split(",") if name.strip()] if metrics else None
    run_eval(target, data=data_path, split=split, compare_base=compare_base, max_new_tokens=max_new_tokens,
             batch_size=batch_size, output=output, device=device, harness=harness, metrics=names)


@dataclass
class EvalData:
    """Rows to score: (input_ids, labels) for the loss; prompts and reference replies for generation."""

    description: str
    loss_rows: list[tuple[list[int], list[int]]]
    prompts: list[list[int]]
    references: list[str]
    notes: list[str] = field(default_factory=list)


def run_eval(target_name: str, *, data: str | None = None, split: str | None = None, compare_base: bool = False,
             max_new_tokens: int = 128, batch_size: int = 32, output: str | None = None, device: str | None = None,
             harness: str | None = None, metrics: list[str] | None = None) -> dict:
    from lorakit.evaluation.metrics import DEFAULT_REPLY_METRICS, check_reply_metrics
    from lorakit.evaluation.report import print_report
    from lorakit.models.inference import (
        load_base_model,
        load_target_model,
        load_target_tokenizer,
        resolve_target,
    )
    from lorakit.models.loading import choose_placement, quiet_upstream_logs

    quiet_upstream_logs()
    target = resolve_target(target_name)
    if compare_base and target.base_name is None:
        raise LorakitError(f"--compare-base: the base of {target_name} is unknown (it is not a lorakit run, recipe "
                           "or merged folder); score the base on its own with `lorakit eval BASE --data ...`")
    report_path = choose_report_path(target, output)
    from lorakit.evaluation.classification import evaluate_classifier, is_classifier
    if is_classifier(target):  # a classify run or merged classifier: accuracy, F1, the confusion matrix
        return evaluate_classifier(target, report_path, data, split, compare_base, batch_size, device, harness)
    from lorakit.evaluation.preference import is_preference_eval, run_preference_eval

    if not harness and is_preference_eval(target, data, split):  # chosen/rejected pairs: which one the model prefers
        return run_preference_eval(target, data, split, compare_base, batch_size, report_path, device)
    if harness:
        require_harness()
    chosen = (target.recipe.sections.get("evaluation") or {}).get("metrics") if target.recipe is not None else None
    metrics = check_reply_metrics(metrics or chosen or list(DEFAULT_REPLY_METRICS),
                                  "--metrics" if metrics else "evaluation.metrics")

    tokenizer = load_target_tokenizer(target)
    eval_data = load_eval_data(target, data, split, tokenizer)
    placement = choose_placement(target.model_section, device)
    bits = "4-bit" if (target.quantization or {}).get("load_in_4bit") else "8-bit"
    click.echo(f"lorakit eval: {target_name} on {eval_data.description}")
    click.echo(f"  {len(eval_data.loss_rows)} rows for the loss, {len(eval_data.prompts)} with a reference reply; "
               f"{placement.device_name}, {placement.dtype}"
               + (f", {bits} base as in training" if target.quantization else ""))

    model = load_target_model(target, placement)
    results = {"model": score(model, tokenizer, eval_data, batch_size, max_new_tokens, "model", metrics)}
    harness_results = run_harness(model, tokenizer, harness, batch_size) if harness else None
    if compare_base:
        from lorakit.evaluation.preference import START_ADAPTER, start_run_folder, using

        dpo_run = target.kind == "adapter" and target.recipe is not None and target.recipe.command == "dpo"
        start_run = start_run_folder(target) if dpo_run else None
        if start_run is not None:  # a DPO run that continued an SFT run: its start point is the SFT model
            model.load_adapter(str(start_run), adapter_name=START_ADAPTER)
            with using(model, START_ADAPTER):
                results["start"] = score(model, tokenizer, eval_data, batch_size, max_new_tokens, "start", metrics)
            eval_data.notes.append(f"start: the SFT model ({start_run}), the DPO run's starting point")
        elif target.kind == "adapter":
            with model.disable_adapter():  # the same loaded base, without the adapter: no second copy
                results["base"] = score(model, tokenizer, eval_data, batch_size, max_new_tokens, "base", metrics)
        else:
            del model
            model = load_base_model(target.base_name, placement)
            results["base"] = score(model, tokenizer, eval_data, batch_size, max_new_tokens, "base", metrics)

    for name, figures in results.items():
        if figures["replies_cut_at_max_new_tokens"]:  # a cut reply scores as wrong: say how many there were
            eval_data.notes.append(f"{figures['replies_cut_at_max_new_tokens']} of {figures['replies']} {name} replies "
                                   f"reached --max-new-tokens {max_new_tokens} and were cut there (raise it if "
                                   "the references are longer)")
    report = build_report(target, eval_data, results, placement, max_new_tokens, batch_size, tokenizer, metrics)
    if harness_results is not None:
        report["harness"] = harness_results
    print_report(report)
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        partial = report_path.with_name(report_path.name + ".partial")
        partial.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, report_path)  # a report is whole or absent, never half written
        click.echo(f"lorakit: report written to {report_path}")
    else:
        click.echo("lorakit: pass --output report.json to keep the report")
    return report


# ---------------------------------------------------------------- where the report goes


def choose_report_path(target, output: str | None) -> Path | None:
    """--output, else lorakit_eval.json in the target's folder (none for a Hub id); never a file lorakit did not
    write."""
    if output:
        path = Path(output)
    elif target.folder is not None:
        path = target.folder / REPORT_FILE
    else:
        return None
    if path.is_dir():
        raise OutputDirError(f"--output {path} is a folder; give a file name such as {path / REPORT_FILE}")
    if path.exists() and not is_eval_report(path):
        raise OutputDirError(f"{path} already exists and is not a lorakit eval report; nothing was changed. "
                             "Choose another --output")
    return path


def is_eval_report(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("report") == REPORT_MARK
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- data


def load_eval_data(target, data: str | None, split: str | None, tokenizer) -> EvalData:
    """The rows to score, tokenized exactly as training tokenizes (lorakit.data), from --data or the recipe."""
    from lorakit.data.labels import Tokenization, last_trained_span
    from lorakit.data.pipeline import prepare_data, prepare_split
    from lorakit.recipe.sections import DataSection, own_fields

    recipe = target.recipe
    notes = []
    if recipe is None and not data:
        recipe = merged_run_recipe(target)  # a merged folder: the eval data of the run it was merged from
        if recipe is not None:
            notes.append(f"eval data and settings of {recipe.output_dir}, the run this folder was merged from")
    data_section = recipe.data if recipe is not None else \
        {key: default for key, (_, default) in own_fields(DataSection).items() if key not in ("train", "eval")}
    seed = recipe.training.get("seed", 42) if recipe is not None else 42
    train_on = data_section["train_on"]

    def prepare(how: str):
        """(dataset, report) of input_ids/labels; `how` is the data.train_on to label with."""
        tokenization = Tokenization.for_tokenizer(tokenizer, how)
        if data:
            source = {"path": data, "split": split or "test", "name": None, "revision": None, "format": None,
                      "columns": {}, "fraction": None, "weight": None}
            return prepare_split([source], tokenization, data_section, seed)
        if recipe is not None and data_section.get("eval"):
            return prepare_split(data_section["eval"], tokenization, data_section, seed)
        prepared = prepare_data({**data_section, "train_on": how}, tokenizer, seed=seed)
        return prepared.eval, prepared.reports["eval"]

    if data:
        description = data if not split else f"{data} ({split})"
    elif recipe is not None and data_section.get("eval"):
        description = ", ".join(source["path"] for source in data_section["eval"])
    elif recipe is not None and data_section.get("eval_fraction"):
        description = f"the {data_section['eval_fraction']:.0%} of the training data held out in training (seed {seed})"
        notes += check_training_data_unchanged(target, data_section)
    else:
        where = "its recipe has neither data.eval nor data.eval_fraction" if recipe is not None else \
            "it has no recipe to take eval data from"
        raise LorakitError(f"{target.name}: no eval data: {where}; pass --data PATH_OR_ID")

    dataset, report = prepare(train_on)
    if dataset is None or len(dataset) == 0:
        raise LorakitError(f"no rows left to evaluate in {description} after tokenization and filtering")
    loss_rows = list(zip(dataset["input_ids"], dataset["labels"]))
    if report.truncated:
        notes.append(f"{report.truncated} rows were cut at data.max_length={data_section['max_length']} tokens; "
                     "their references are cut too")
    # Generation needs each reply's span; with train_on: all every token is labelled, so label the rows as
    # completions to find it.
    span_rows = dataset if train_on == "completions" else prepare("completions")[0]
    prompts, references = [], []
    for ids, labels in zip(span_rows["input_ids"], span_rows["labels"]):
        span = last_trained_span(labels)
        if span is None or span[0] == 0:
            continue  # plain text: nothing before the trained tokens to answer
        start, end = span
        prompts.append(ids[:start])
        references.append(tokenizer.decode(ids[start:end], skip_special_tokens=True).strip())
    if not prompts:
        notes.append("no row has a prompt and a reference reply (plain text data): loss only")
    return EvalData(description=description, loss_rows=loss_rows, prompts=prompts, references=references,
                    notes=notes)


def merged_run_recipe(target):
    """The recipe of the sft run a merged model folder came from (its lorakit_merge.json names the run), if that run
    folder is still there; None otherwise."""
    from lorakit.models.start_point import recipe_command
    from lorakit.recipe.load import load_recipe
    from lorakit.training.run_dir import RECIPE_FILE

    run = target.merged_from
    if run is None or not (run / RECIPE_FILE).is_file() or recipe_command(run / RECIPE_FILE) != "sft":
        return None
    return load_recipe(run / RECIPE_FILE, check_paths=False, command="sft")


def check_training_data_unchanged(target, data_section: dict) -> list[str]:
    """The held-out split is only the one training held out if the training files are those it read."""
    from lorakit.data.sources import load_source, source_fingerprint
    from lorakit.training.run_dir import read_record

    record = read_record(target.adapter_path) if target.adapter_path is not None else None
    recorded = (record or {}).get("data", {}).get("train", {}).get("sources", [])
    if not recorded:
        return []
    changed = []
    for source, seen in zip(data_section["train"], recorded):
        current = source_fingerprint(source, load_source(source))
        if seen.get("fingerprint") not in (None, "-", current):
            changed.append(source["path"])
    if changed:
        return [f"training data changed since the run ({', '.join(changed)}): the held-out rows are not those "
                "training held out, and may include rows it trained on"]
    return []


# ---------------------------------------------------------------- scoring


def score(model, tokenizer, data: EvalData, batch_size: int, max_new_tokens: int, label: str,
          metrics: list[str]) -> dict:
    """Loss and perplexity on the trained tokens, and the chosen metrics of greedy replies."""
    from lorakit.evaluation.metrics import completion_loss, score_replies
    from lorakit.models.inference import decode_reply, generate_greedy

    started = time.time()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = completion_loss(model, data.loss_rows, pad_token_id=pad, batch_size=batch_size)
    loss_seconds = time.time() - started
    predictions = []
    if data.prompts:
        def progress(done: int, total: int) -> None:
            click.echo(f"\r  {label}: generating {done}/{total}", nl=False, err=True)

        outputs = generate_greedy(model, tokenizer, data.prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, on_batch=progress)
        click.echo("", err=True)
        predictions = [decode_reply(tokenizer, ids) for ids in outputs]
        unfinished = sum(len(ids) >= max_new_tokens for ids in outputs)
    else:
        unfinished = 0
    overall, per_reply = score_replies(predictions, data.references, metrics)
    seconds = time.time() - started
    click.echo(f"  {label}: loss over {loss.tokens:,} trained tokens in {loss_seconds:.1f} s, "
               f"{len(predictions)} replies in {seconds - loss_seconds:.1f} s")
    return {
        "loss": loss.loss,
        "perplexity": loss.perplexity,
        "trained_tokens": loss.tokens,
        **overall,
        "replies": len(predictions),
        "replies_cut_at_max_new_tokens": unfinished,
        "seconds": round(seconds, 2),
        "predictions": predictions,
        "per_reply": per_reply,
    }


# ---------------------------------------------------------------- lm-evaluation-harness


def require_harness() -> None:
    """Checked before any model is loaded, so a missing extra costs nothing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise LorakitError("--harness needs lm-evaluation-harness, an optional extra: pip install lm-eval "
                           "(its tasks download their datasets from the Hugging Face Hub)")


def run_harness(model, tokenizer, tasks: str, batch_size: int) -> dict:
    """Hand the loaded model (adapter included) to lm-evaluation-harness; its results go into the report as is."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = [task.strip() for task in tasks.split(",") if task.strip()]
    click.echo(f"  lm-evaluation-harness: {', '.join(names)}")
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=harness_model, tasks=names)
    return {"tasks": names, "results": output.get("results", {}) if output else {}}


# ---------------------------------------------------------------- report


def build_report(target, data: EvalData, results: dict, placement, max_new_tokens: int, batch_size: int,
                 tokenizer, metrics: list[str]) -> dict:
    from lorakit.training.run_dir import library_versions

    examples = []
    for index, (prompt, reference) in enumerate(zip(data.prompts, data.references)):
        example = {"prompt": tokenizer.decode(prompt, skip_special_tokens=False), "reference": reference}
        for name, figures in results.items():
            key = "prediction" if name == "model" else f"{name}_prediction"
            example[key] = figures["predictions"][index]
            for metric, scores in figures["per_reply"].items():
                example[f"{name}_{metric}"] = scores[index]
        examples.append(example)
    figures_of = {name: {key: value for key, value in figures.items() if key not in ("predictions", "per_reply")}
                  for name, figures in results.items()}
    return {
        "report": REPORT_MARK,
        "target": target.name,
        "kind": "run (adapter)" if target.kind == "adapter" else "model",
        "base_model": target.base_name,
        "data": {"description": data.description, "loss_rows": len(data.loss_rows),
                 "generation_rows": len(data.prompts), "notes": data.notes + target.notes},
        "settings": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "device": placement.device, "dtype": placement.dtype, "quantization": target.quantization,
                     "metrics": metrics},
        "metrics": figures_of,
        "examples": examples,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
    }
