"""lorakit from Python (a notebook, a script): the runs the command line makes, returning what they produced.

    import lorakit

    run = lorakit.sft("recipes/quickstart.yaml", training={"max_steps": 50}, output_dir="runs/qs-50")
    run.metrics["train_loss"], run.loss_plot             # numbers and files, not only printed lines
    scores = lorakit.evaluate(run.output_dir, compare_base=True)
    scores.metrics["exact_match"], scores.base_metrics["exact_match"]
    merged = lorakit.merge(run.output_dir)

A recipe is a file or a dict in the same shape as the YAML (paths in a dict are relative to the working
directory). Keyword arguments named after a section (`model`, `data`, `lora`, `training`, `quantization`, ...)
override the recipe as dotted command-line overrides do: a dict is merged key by key, any other value replaces.
Every check of the command line applies, and a mistake raises the same `lorakit.errors` exception the command
line turns into its one-line message (RecipeError, DataError, ...). The docs: docs/python-api.md.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

RecipeLike = Any  # str | os.PathLike | Mapping | lorakit.recipe.sections.Recipe
BUILDERS = {"sft": ("lorakit.commands.sft", "build_sft"), "dpo": ("lorakit.commands.dpo", "build_dpo"),
            "classify": ("lorakit.commands.classify", "build_classify")}


# ---------------------------------------------------------------- results


@dataclass
class TrainResult:
    """A finished training run: its folder, its final metrics and the files it wrote."""

    output_dir: Path
    status: str  # "completed" (an interrupted or failed run raises instead)
    metrics: dict[str, float]  # train_loss, train_runtime, eval_loss (with eval data), ...
    log_history: list[dict] = field(repr=False)  # every logged step, as the Trainer logged it
    record: dict[str, Any] = field(repr=False)  # lorakit_run.json: versions, device, data fingerprints, ...
    loss_plot: Path | None = None  # loss.png
    card: Path | None = None  # README.md, the model card

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, training loss) of every logged step."""
        return [(entry["step"], entry["loss"]) for entry in self.log_history if "loss" in entry]

    @classmethod
    def of(cls, folder: str | os.PathLike) -> TrainResult:
        """The result of the run in `folder` (also one trained from the command line)."""
        from lorakit.training.run_dir import read_record

        folder = Path(folder)
        record = read_record(folder) or {}
        plot, card = folder / "loss.png", folder / "README.md"
        return cls(output_dir=folder, status=record.get("status", "unknown"), metrics=record.get("metrics") or {},
                   log_history=record.get("log_history") or [], record=record,
                   loss_plot=plot if plot.is_file() else None, card=card if card.is_file() else None)


@dataclass
class EvalResult:
    """A `lorakit eval` report: the model's numbers, the base model's (with compare_base), and the file."""

    metrics: dict[str, Any]  # loss, perplexity, the reply metrics, replies, replies_cut_at_max_new_tokens, ...
    base_metrics: dict[str, Any] | None
    report: dict[str, Any] = field(repr=False)  # the whole report: settings, notes, every example with its scores
    report_path: Path | None = None

    @property
    def examples(self) -> list[dict]:
        return self.report.get("examples") or []


@dataclass
class MergeResult:
    """A merged model folder and the figures of its logit check (lorakit_merge.json)."""

    output_dir: Path
    check: dict[str, Any]
    record: dict[str, Any] = field(repr=False)


# ---------------------------------------------------------------- recipes


def load_recipe(recipe: RecipeLike, command: str = "sft", **sections: Any):
    """The validated Recipe for `command`, from a file, a dict or a Recipe, with section overrides applied."""
    from lorakit.models.loading import quiet_upstream_logs
    from lorakit.recipe.sections import Recipe

    quiet_upstream_logs()  # before peft and bitsandbytes are imported: bitsandbytes speaks up on import
    if isinstance(recipe, Recipe):
        if sections:
            raise LorakitError("overrides apply to a recipe file or dict; this Recipe is already validated")
        return recipe
    if isinstance(recipe, Mapping):
        from lorakit.recipe.load import LineMap
        from lorakit.recipe.validation import Validator

        data = copy.deepcopy(dict(recipe))
        overridden: set[tuple] = set()
        for name, value in sections.items():
            merge_into(data, (name,), value, overridden)
        return Validator(None, LineMap(None), overridden, True, command).validate(data)
    if not isinstance(recipe, (str, os.PathLike)):
        raise LorakitError(f"a recipe is a file path, a dict or a Recipe, not {type(recipe).__name__}")
    from lorakit.recipe.load import load_recipe as load_file

    return load_file(recipe, dotted_overrides(sections), command=command)


def merge_into(data: dict, path: tuple, value: Any, overridden: set[tuple]) -> None:
    """Set `value` at `path` of the recipe: a dict merges key by key into a section or mapping, anything else
    replaces what was there."""
    target = data
    for key in path[:-1]:
        target = target.setdefault(key, {})
    key = path[-1]
    if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
        target[key] = dict(target[key])
        for inner, item in value.items():
            merge_into(data, (*path, inner), item, overridden)
        return
    if key == "model" and len(path) == 1 and isinstance(value, Mapping) and isinstance(target.get(key), str):
        value = {"name_or_path": target[key], **value}  # `model: owner/name` shorthand, then keys of it
    target[key] = copy.deepcopy(value)
    overridden.add(path)


def dotted_overrides(sections: dict[str, Any], prefix: str = "") -> list[str]:
    """{'training': {'max_steps': 10}} -> ['training.max_steps=10'], for a recipe file (JSON is YAML)."""
    out = []
    for key, value in sections.items():
        if isinstance(value, Mapping) and value:
            out += dotted_overrides(dict(value), f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value, default=str)}")
    return out


# ---------------------------------------------------------------- training


def train(command: str, recipe: RecipeLike, *, output_dir: str | os.PathLike | None = None, overwrite: bool = False,
          no_resume: bool = False, resume_changed: bool = False, device: str | None = None,
          callbacks: tuple = (), **sections: Any) -> TrainResult:
    """Run a training command ("sft", "dpo", "classify") as `lorakit COMMAND RECIPE` does, in this process."""
    from lorakit.models.loading import quiet_upstream_logs
    from lorakit.training import lifecycle

    if command not in BUILDERS:
        raise LorakitError(f"no training command {command!r}; choose from {', '.join(BUILDERS)}")
    quiet_upstream_logs()
    if output_dir is not None:
        sections = {**sections, "training": {**dict(sections.get("training") or {}),
                                             "output_dir": str(Path(output_dir).absolute())}}
    module, name = BUILDERS[command]
    build = getattr(importlib.import_module(module), name)
    resolved = load_recipe(recipe, command, **sections)
    folder = lifecycle.run(resolved, build, overwrite=overwrite, no_resume=no_resume, resume_changed=resume_changed,
                           device=device, callbacks=tuple(callbacks))
    return TrainResult.of(Path(folder))


def sft(recipe: RecipeLike, **options: Any) -> TrainResult:
    """`lorakit sft`: LoRA/QLoRA supervised fine-tuning. Options: output_dir, overwrite, no_resume, resume_changed,
    device, callbacks (extra transformers TrainerCallbacks), and section overrides (training={...}, lora={...})."""
    return train("sft", recipe, **options)


def dpo(recipe: RecipeLike, **options: Any) -> TrainResult:
    """`lorakit dpo`: preference tuning; the same options as sft."""
    return train("dpo", recipe, **options)


def classify(recipe: RecipeLike, **options: Any) -> TrainResult:
    """`lorakit classify`: a classification head with LoRA; the same options as sft."""
    return train("classify", recipe, **options)


# ---------------------------------------------------------------- after training


def evaluate(target: str | os.PathLike, *, data: str | os.PathLike | None = None, split: str | None = None,
             compare_base: bool = False, metrics: list[str] | None = None, max_new_tokens: int = 128,
             batch_size: int = 32, output: str | os.PathLike | None = None, device: str | None = None) -> EvalResult:
    """`lorakit eval` on a run folder, merged folder, recipe file or Hub id; the report is also written as the
    command writes it (lorakit_eval.json in the folder, or `output`)."""
    from lorakit.commands.evaluate import choose_report_path, run_eval
    from lorakit.models.inference import resolve_target
    from lorakit.models.loading import quiet_upstream_logs

    quiet_upstream_logs()
    report = run_eval(str(target), data=str(data) if data is not None else None, split=split,
                      compare_base=compare_base, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      output=str(output) if output is not None else None, device=device, metrics=metrics)
    path = choose_report_path(resolve_target(str(target)), str(output) if output is not None else None)
    figures = report.get("metrics") or {}
    return EvalResult(metrics=figures.get("model", figures), base_metrics=figures.get("base"), report=report,
                      report_path=path if path is not None and path.is_file() else None)


def merge(run: str | os.PathLike, *, output: str | os.PathLike | None = None, base: str | None = None,
          dtype: str = "auto", device: str = "cpu") -> MergeResult:
    """`lorakit merge`: the run's adapter folded into its base, checked by its logits."""
    from lorakit.models.loading import quiet_upstream_logs
    from lorakit.models.merge import MERGE_RECORD, merge_run

    quiet_upstream_logs()
    folder = Path(merge_run(run, output=output, base=base, dtype=dtype, device=device))
    record = json.loads((folder / MERGE_RECORD).read_text(encoding="utf-8"))
    return MergeResult(output_dir=folder, check=record.get("check") or {}, record=record)


def generate(target: str | os.PathLike, prompt: str, *, system: str | None = None, max_new_tokens: int = 256,
             device: str | None = None) -> str:
    """`lorakit generate`: one greedy reply through the chat template."""
    from lorakit.commands.generate import generate_reply
    from lorakit.models.loading import quiet_upstream_logs

    quiet_upstream_logs()
    return generate_reply(str(target), prompt, system=system, max_new_tokens=max_new_tokens, device=device)


def validate(recipe: str | os.PathLike, *, samples: int = 2, gpu_memory: str | None = None,
             device: str | None = None, **sections: Any):
    """`lorakit validate` on a recipe file: returns its findings (`.problems`, `.warnings`); the run can start
    when `.problems` is empty."""
    from lorakit.commands.validate import parse_gpu_memory
    from lorakit.commands.validate import validate as run_checks

    if not isinstance(recipe, (str, os.PathLike)):
        raise LorakitError("lorakit.validate takes a recipe file; for a dict, lorakit.load_recipe(recipe) checks "
                           "the recipe itself")
    return run_checks(str(recipe), tuple(dotted_overrides(sections)), samples=samples,
                      gpu_memory=parse_gpu_memory(gpu_memory), device=device)
