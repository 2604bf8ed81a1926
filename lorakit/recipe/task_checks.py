"""`lorakit classify`'s checks of its `task` section against the sections it shares with sft (called by
recipe.validation, which gives each problem its YAML path and line)."""

from __future__ import annotations

from typing import Callable

from lorakit.recipe.sections import CLASSIFY_METRICS, LORA_DEFAULTS


def check_task(raw: dict, task: dict, lora: dict, training: dict, problem: Callable[[tuple, str], None]) -> None:
    """Problems of a classify recipe beyond its keys' types; sets lora.task_type to peft's SEQ_CLS."""
    kind, names = task.get("type"), task.get("labels")
    raw_data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if raw_data.get("train_on", "completions") != "completions":  # the default, as a resolved recipe writes it
        problem(("data", "train_on"), "applies to sft only: classify trains on task.label_column")
    for split in ("train", "eval"):
        sources = raw_data.get(split)
        for index, source in enumerate(sources if isinstance(sources, list) else [sources]):
            if isinstance(source, dict) and source.get("format") is not None:
                problem(("data", split, index, "format"), "applies to sft only: classify reads task.text_column "
                        "and task.label_column (rename with columns: {text: your_column})")
    if names is not None and kind == "regression":
        problem(("task", "labels"), "a regression head predicts one number, with no label names")
    elif names is not None and len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        problem(("task", "labels"), f"names a label more than once: {', '.join(twice)}")
    elif names is not None and len(names) < 2:
        problem(("task", "labels"), "needs at least 2 labels")
    if task.get("class_weights") and kind == "regression":
        problem(("task", "class_weights"), "applies to classification and multi_label, not regression")
    raw_lora = raw.get("lora")
    if isinstance(raw_lora, dict) and raw_lora.get("task_type") not in (None, "SEQ_CLS"):
        problem(("lora", "task_type"), "classify trains a sequence-classification head: SEQ_CLS, which lorakit "
                "sets; remove the key")
    # A resolved recipe writes lorakit's LoRA defaults out in full; only a setting of the user's means LoRA was meant.
    settings = [key for key, value in (raw_lora if isinstance(raw_lora, dict) else {}).items()
                if key != "task_type" and LORA_DEFAULTS.get(key) != value]
    if task.get("head_only") and settings:
        problem(("lora",), "task.head_only trains the head alone, without LoRA: remove the lora section, or set "
                "task.head_only: false")
    lora["task_type"] = "SEQ_CLS"
    metric, known = training.get("metric_for_best_model"), CLASSIFY_METRICS.get(kind, ())
    if isinstance(metric, str) and metric.removeprefix("eval_") not in (*known, "loss"):
        problem(("training", "metric_for_best_model"), f"a {kind} task is scored by {', '.join(known)} or loss, "
                f"not {metric!r}")
