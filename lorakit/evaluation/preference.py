"""`lorakit eval` on preference pairs (chosen / rejected): which response a model prefers, and by how much.

Each pair is tokenized as `lorakit dpo` tokenizes it (lorakit.data.preferences), and each response scored by the
log-probability the model gives its scored tokens (the reply and its end-of-turn token), summed, as DPO scores it.

  preference accuracy   share of pairs whose chosen response has the higher log-probability
  mean margin           mean of log p(chosen) - log p(rejected), in nats
  reward accuracy       for a DPO run: DPO's implicit reward, beta x (log p - log p_reference), is higher for the
  mean reward margin    chosen response; and its mean margin (trl's rewards/accuracies and rewards/margins,
                        measured on held-out pairs against the run's reference)

--compare-base adds the start point side by side: the SFT model for a DPO run that continued one (the base +
the SFT adapter, on the same loaded base), else the base model.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import click

from lorakit.errors import LorakitError

REPORT_MARK = "lorakit eval"  # lorakit eval's mark on its reports (commands/evaluate.py): a rerun replaces them
START_ADAPTER = "start"
MAX_BATCH_TOKENS = 8192  # as lorakit.evaluation.metrics: rows x longest row, so the logits fit in memory
SAMPLES_SHOWN = 3


def is_preference_eval(target, data: str | None, split: str | None) -> bool:
    """True when the rows to score are preference pairs: --data with chosen and rejected columns, or, without
    --data, a DPO run's own eval pairs."""
    if data is None:
        return target.recipe is not None and target.recipe.command == "dpo"
    from lorakit.data.sources import load_source

    columns = load_source(eval_source(data, split)).column_names
    return "chosen" in columns and "rejected" in columns


def eval_source(data: str, split: str | None) -> dict:
    return {"path": data, "split": split or "test", "name": None, "revision": None, "format": None, "columns": {},
            "fraction": None, "weight": None}


def run_preference_eval(target, data: str | None, split: str | None, compare_base: bool, batch_size: int,
                        report_path: Path | None, device: str | None) -> dict:
    from lorakit.models.inference import load_base_model, load_target_model, load_target_tokenizer
    from lorakit.models.loading import choose_placement

    tokenizer = load_target_tokenizer(target)
    pairs, description = load_pairs(target, data, split, tokenizer)
    placement = choose_placement(target.model_section, device)
    click.echo(f"lorakit eval: {target.name} on {len(pairs)} preference pairs of {description}")
    model = load_target_model(target, placement)
    recipe = target.recipe
    dpo = recipe is not None and recipe.command == "dpo"
    start_run = start_run_folder(target) if dpo else None
    if start_run is not None:
        model.load_adapter(str(start_run), adapter_name=START_ADAPTER)  # the SFT model, on the same base
        model.set_adapter("default")
    results = {"model": score(model, pairs, batch_size, "model")}
    start_name = f"the SFT model ({start_run})" if start_run else f"the base model ({target.base_name})"
    if dpo:
        reference = recipe.sections["preference"].get("reference") or ("sft" if start_run else "base")
        with using(model, START_ADAPTER if reference == "sft" else None):
            reference_scores = score(model, pairs, batch_size, "reference")
        results["model"].update(rewards(results["model"], reference_scores, recipe.training.get("beta", 0.1)))
        results["model"]["reward_reference"] = "the SFT model" if reference == "sft" else "the base model"
        if compare_base:
            same = (reference == "sft") == (start_run is not None)
            results["start"] = reference_scores if same else score_with(model, START_ADAPTER, pairs, batch_size)
    elif compare_base:
        if target.kind == "adapter":
            with model.disable_adapter():  # the same loaded base, without the adapter: no second copy
                results["start"] = score(model, pairs, batch_size, "base")
        else:
            del model
            results["start"] = score(load_base_model(target.base_name, placement), pairs, batch_size, "base")
    if "start" in results:
        results["start"]["model"] = start_name
    report = build_report(target, description, pairs, results, placement, tokenizer)
    print_report(report)
    if report_path is not None:
        write_report(report, report_path)
    return report


def start_run_folder(target) -> Path | None:
    from lorakit.models.start_point import is_run_folder

    name = target.recipe.model["name_or_path"]
    return Path(name) if is_run_folder(name) else None


def score_with(model, adapter: str, pairs: list[dict], batch_size: int) -> dict:
    with using(model, adapter):
        return score(model, pairs, batch_size, "start")


@contextmanager
def using(model, adapter: str | None):
    """The model with only `adapter` active (None: every adapter off), then as before."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)


# ---------------------------------------------------------------- pairs


def load_pairs(target, data: str | None, split: str | None, tokenizer) -> tuple[list[dict], str]:
    """The pairs to score, tokenized as `lorakit dpo` tokenizes them, from --data or the run's recipe."""
    from lorakit.data.labels import Tokenization
    from lorakit.data.preferences import prepare_pair_split, prepare_pairs
    from lorakit.recipe.sections import DataSection, own_fields

    recipe = target.recipe
    dpo = recipe is not None and recipe.command == "dpo"
    section = recipe.data if recipe is not None else \
        {key: default for key, (_, default) in own_fields(DataSection).items() if key not in ("train", "eval")}
    on_bad_rows = recipe.sections["preference"]["on_bad_rows"] if dpo else "error"
    seed = recipe.training.get("seed", 42) if recipe is not None else 42
    tokenization = Tokenization.for_tokenizer(tokenizer, "completions")
    if data:
        dataset, _ = prepare_pair_split([eval_source(data, split)], tokenization, section, on_bad_rows, seed)
        description = data if not split else f"{data} ({split})"
    elif dpo and section.get("eval"):  # only the eval sources: the training pairs need not be tokenized again
        dataset, _ = prepare_pair_split(section["eval"], tokenization, section, on_bad_rows, seed)
        description = ", ".join(source["path"] for source in section["eval"])
    elif dpo and section.get("eval_fraction"):  # the same split of the training pairs as in training
        dataset = prepare_pairs(section, tokenizer, on_bad_rows, seed).eval
        description = f"the {section['eval_fraction']:.0%} of the training pairs held out in training (seed {seed})"
    else:
        raise LorakitError(f"{target.name}: no eval pairs: its recipe has neither data.eval nor data.eval_fraction; "
                           "pass --data PATH_OR_ID with chosen and rejected columns")
    if dataset is None or len(dataset) == 0:
        raise LorakitError(f"no pairs left to evaluate in {description}")
    return [dict(row) for row in dataset], description


# ---------------------------------------------------------------- scoring


def score(model, pairs: list[dict], batch_size: int, label: str) -> dict:
    """The summed log-probability of each pair's chosen and rejected response, and what they add up to."""
    started = time.time()
    sequences = [(p["prompt_ids"], p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")]
    logps = response_logps(model, sequences, batch_size)
    chosen, rejected = logps[0::2], logps[1::2]
    margins = [c - r for c, r in zip(chosen, rejected)]
    click.echo(f"  {label}: {len(sequences)} responses scored in {time.time() - started:.1f} s")
    return {"preference_accuracy": mean([float(m > 0) for m in margins]), "mean_margin": mean(margins),
            "mean_logp_chosen": mean(chosen), "mean_logp_rejected": mean(rejected), "pairs": len(pairs),
            "logps": list(zip(chosen, rejected))}


def rewards(model_scores: dict, reference_scores: dict, beta: float) -> dict:
    """DPO's implicit rewards of the model against a reference: beta x (log p - log p_reference)."""
    margins = [beta * ((c - rc) - (r - rr))
               for (c, r), (rc, rr) in zip(model_scores["logps"], reference_scores["logps"])]
    return {"reward_accuracy": mean([float(m > 0) for m in margins]), "mean_reward_margin": mean(margins),
            "beta": beta}


def response_logps(model, sequences: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Sum of log p(token) over each response's tokens, given its prompt; batched longest first, right-padded."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    out = [0.0] * len(sequences)
    start = 0
    while start < len(order):
        width = sum(map(len, sequences[order[start]]))
        chosen = order[start:start + max(1, min(batch_size, MAX_BATCH_TOKENS // max(width, 1)))]
        ids = torch.zeros((len(chosen), width), dtype=torch.long)
        scored = torch.zeros((len(chosen), width), dtype=torch.bool)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, index in enumerate(chosen):
            prompt, response = sequences[index]
            ids[row, :len(prompt) + len(response)] = torch.tensor(prompt + response, dtype=torch.long)
            scored[row, len(prompt):len(prompt) + len(response)] = True
            mask[row, :len(prompt) + len(response)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            targets, keep = ids[:, 1:].to(device), scored[:, 1:].to(device)
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums = (token_logps * keep).sum(dim=1).cpu().tolist()
        for row, index in enumerate(chosen):
            out[index] = sums[row]
        start += len(chosen)
    return out


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- report


def build_report(target, description: str, pairs: list[dict], results: dict, placement, tokenizer) -> dict:
    from lorakit.training.run_dir import library_versions

    examples = []
    for index, pair in enumerate(pairs[:SAMPLES_SHOWN]):
        example = {"prompt": tokenizer.decode(pair["prompt_ids"], skip_special_tokens=False),
                   "chosen": tokenizer.decode(pair["chosen_ids"], skip_special_tokens=False),
                   "rejected": tokenizer.decode(pair["rejected_ids"], skip_special_tokens=False)}
        for name, figures in results.items():
            example[f"{name}_logp_chosen"], example[f"{name}_logp_rejected"] = figures["logps"][index]
        examples.append(example)
    return {
        "report": REPORT_MARK,
        "kind": "preference pairs",
        "target": target.name,
        "base_model": target.base_name,
        "data": {"description": description, "pairs": len(pairs), "notes": list(target.notes)},
        "settings": {"device": placement.device, "dtype": placement.dtype, "quantization": target.quantization},
        "metrics": {name: {k: v for k, v in figures.items() if k != "logps"} for name, figures in results.items()},
        "examples": examples,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
    }


def print_report(report: dict) -> None:
    metrics = report["metrics"]
    model, start = metrics["model"], metrics.get("start")
    rows = [("preference accuracy", "preference_accuracy", "{:.1%}"), ("mean margin (nats)", "mean_margin", "{:+.3f}"),
            ("mean log p(chosen)", "mean_logp_chosen", "{:.3f}"), ("mean log p(rejected)", "mean_logp_rejected",
                                                                   "{:.3f}")]
    header = ["", "model"] + (["start", "change"] if start else [])
    table = [header]
    for title, key, form in rows:
        line = [title, form.format(model[key])]
        if start:
            change = model[key] - start[key]
            line += [form.format(start[key]), f"{100 * change:+.1f} pts" if key == "preference_accuracy"
                     else f"{change:+.3f}"]
        table.append(line)
    if "reward_accuracy" in model:
        table.append([f"reward accuracy (vs {model['reward_reference']})", f"{model['reward_accuracy']:.1%}"])
        table.append([f"mean reward margin (beta {model['beta']:g})", f"{model['mean_reward_margin']:+.3f}"])
    widths = [max(len(line[i]) for line in table if i < len(line)) for i in range(len(header))]
    click.echo("")
    for line in table:
        click.echo("  " + "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                    for i, cell in enumerate(line)))
    if start:
        click.echo(f"  start: {start['model']}")
    for note in report["data"]["notes"]:
        click.echo(f"  note: {note}")
    click.echo("")


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)  # a report is whole or absent, never half written
    click.echo(f"lorakit: report written to {path}")
