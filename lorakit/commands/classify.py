"""`lorakit classify`: adapt a pretrained model to a labelling task (classification, multi-label, regression) with a
new head, LoRA (or the head alone) and transformers' Trainer.

recipe -> tokenizer -> rows of text + label (lorakit.data.classification) -> the base with a new head
(lorakit.models.classifier) -> TrainingArguments + Trainer, evaluated with accuracy/F1 (or MSE/correlations) and
keeping the best adapter, handed to the shared run lifecycle (lorakit.training.lifecycle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lorakit.commands.training_options import (
    relaunch_if_distributed,
    run_options,
    training_command,
)
from lorakit.recipe.load import load_recipe, with_output_dir
from lorakit.recipe.sections import Recipe


@training_command
def command(recipe: str, overrides: tuple[str, ...], **options: Any) -> None:
    """Train a classifier (or regressor) head with LoRA as RECIPE's task section describes."""
    loaded = load_recipe(recipe, with_output_dir(overrides, options["output_dir"]), command="classify")
    relaunch_if_distributed("classify", recipe, overrides, loaded, options)
    run_classify(recipe, overrides, **run_options(options))


def run_classify(recipe_path: str, overrides: tuple[str, ...] = (), *, output_dir: str | None = None,
                 overwrite: bool = False, no_resume: bool = False, resume_changed: bool = False,
                 device: str | None = None) -> Path:
    from lorakit.training import lifecycle

    return lifecycle.run_recipe("classify", recipe_path, overrides, build_classify, output_dir=output_dir,
                                overwrite=overwrite, no_resume=no_resume, resume_changed=resume_changed, device=device)


def build_classify(context) -> Any:
    """Tokenizer, labelled rows, the base with its new head, and a Trainer: what `lorakit classify` trains."""
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from lorakit.data.classification import (
        balanced_weights,
        prepare_classification_data,
    )
    from lorakit.evaluation.classification import trainer_metrics
    from lorakit.models import classifier
    from lorakit.training.lifecycle import Built

    recipe, placement = context.recipe, context.placement
    task = recipe.sections["task"]
    click.echo(f"lorakit: loading tokenizer of {recipe.model['name_or_path']}")
    tokenizer = classifier.load_classifier_tokenizer(recipe.model)
    click.echo("lorakit: preparing data")
    data = prepare_classification_data(recipe.data, task, tokenizer, recipe.training.get("seed", 42))
    args = build_training_arguments(recipe, placement, data.eval is not None)
    click.echo(f"lorakit: loading model on {placement.device} ({placement.dtype}) with a new {data.labels.type} "
               f"head of {data.labels.num_labels} output{'s' if data.labels.num_labels != 1 else ''}")
    set_seed(args.seed)  # the new head and the LoRA weights start from the recipe's seed, not whatever came before
    base, head = classifier.load_classifier(recipe, placement, data.labels, tokenizer,
                                            gradient_checkpointing=bool(args.activation_checkpointing))
    if args.activation_checkpointing:
        base.enable_input_require_grads()  # checkpointed blocks need an input that requires grad to backpropagate
    model = classifier.build_trainable_model(base, recipe.lora, head, task["head_only"])
    loss = None
    if task["class_weights"] == "balanced":
        loss = classifier.weighted_loss(balanced_weights(data.reports["train"], data.labels), data.labels.type)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=trainer_metrics(data.labels.type, data.labels.names) if data.eval else None,
                      compute_loss_func=loss, callbacks=[*context.callbacks, show_metrics(data.labels.type)])
    record = classifier.task_record(data.labels, task, tokenizer.pad_token_id)

    def save(trainer, out: Path) -> None:
        classifier.save_classifier(trainer, tokenizer, record, out)

    return Built(trainer=trainer, tokenizer=tokenizer, has_eval=data.eval is not None, save=save,
                 summary=[*classifier.trainable_rows(model, head, task["head_only"]),
                          *task_rows(data, task, recipe), *best_rows(args)],
                 record={"task": record, "data": {split: report.to_dict() for split, report in data.reports.items()}})


def show_metrics(kind: str):
    """A callback printing each evaluation's task metrics (the progress line shows the loss alone)."""
    from transformers import TrainerCallback

    from lorakit.recipe.sections import CLASSIFY_METRICS

    class ShowMetrics(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            shown = [(name, (metrics or {}).get(f"eval_{name}")) for name in CLASSIFY_METRICS[kind]]
            if state.is_world_process_zero and any(value is not None for _, value in shown):
                width = len(str(state.max_steps))
                click.echo(f"  step {state.global_step:>{width}}/{state.max_steps}  eval " + ", ".join(
                    f"{name} {value:.4f}" if kind == "regression" else f"{name} {value:.1%}"
                    for name, value in shown if value is not None))

    return ShowMetrics()


def task_rows(data, task: dict, recipe: Recipe) -> list[tuple[str, str]]:
    """Summary rows: the labels and their counts (class imbalance shows), and what was left out."""
    labels = data.labels
    rows = []
    for split, report in data.reports.items():
        if labels.type == "regression":
            scores = report.scores
            text = f"{report.rows:,} rows; {task['label_column']} {scores['min']:.4g} to {scores['max']:.4g}, " \
                   f"mean {scores['mean']:.4g}"
        else:
            counts = sorted(report.label_counts.items(), key=lambda item: -item[1])
            top = counts[0][1] / max(report.rows, 1)
            shown = ", ".join(f"{name} {count:,}" for name, count in counts[:12])
            more = f", ... {len(counts) - 12} more" if len(counts) > 12 else ""
            text = f"{report.rows:,} rows ({report.tokens:,} tokens): {shown}{more}; largest class {top:.1%}"
            absent = [name for name, count in counts if count == 0]
            if absent and split == "train":
                text += f"; no rows of {', '.join(absent[:5])}"
        rows.append((f"{split} data", text))
        cut = []
        if report.dropped_bad_label:
            cut.append(f"{report.dropped_bad_label} dropped for their label (task.bad_labels: drop), e.g. "
                       + report.dropped_examples[0])
        if report.truncated:
            cut.append(f"{report.truncated} truncated to {recipe.data['max_length']} tokens")
        if report.dropped_too_long:
            cut.append(f"{report.dropped_too_long} dropped as longer than {recipe.data['max_length']} tokens")
        rows += [("", text) for text in cut]
    rows.append(("task", f"{labels.type}, {labels.num_labels} label{'s' if labels.num_labels != 1 else ''}"
                         + (", class weights balanced" if task["class_weights"] else "")))
    return rows


def best_rows(args) -> list[tuple[str, str]]:
    if not args.load_best_model_at_end:
        return []
    every = f"{args.eval_steps:.0%} of the steps" if args.eval_steps < 1 else f"{args.eval_steps:g} steps"
    return [("best", f"the adapter with the best {args.metric_for_best_model} on eval data is kept "
                     f"(evaluated every {every})")]


def build_training_arguments(recipe: Recipe, placement, has_eval: bool) -> Any:
    """transformers.TrainingArguments from the recipe's training section plus what lorakit decides here."""
    from transformers import TrainingArguments

    from lorakit.errors import LorakitError
    from lorakit.evaluation.classification import DEFAULT_METRIC, LOWER_IS_BETTER
    from lorakit.training.settings import machine_settings

    settings = machine_settings(recipe.training, placement, bool(recipe.quantization))
    settings.setdefault("train_sampling_strategy", "group_by_length")  # batches of similar lengths: little padding
    settings["label_names"] = ["labels"]  # a PeftModel's forward does not name them for the Trainer to find
    if has_eval:
        settings.setdefault("eval_strategy", "steps")
        settings.setdefault("eval_steps", 0.1 if recipe.early_stopping else 0.2)
        metric = settings.get("metric_for_best_model") or DEFAULT_METRIC[recipe.sections["task"]["type"]]
        settings["metric_for_best_model"] = metric
        settings.setdefault("greater_is_better", metric.removeprefix("eval_") not in LOWER_IS_BETTER)
        # The adapter saved at the end is the best one evaluated, not the last (early stopping needs it too).
        settings["load_best_model_at_end"] = bool(recipe.early_stopping) or settings.get("load_best_model_at_end",
                                                                                          True)
        if settings["load_best_model_at_end"]:
            settings.setdefault("save_strategy", settings["eval_strategy"])
            settings.setdefault("save_steps", settings["eval_steps"])
    try:
        return TrainingArguments(**settings)
    except ValueError as error:  # combinations TrainingArguments refuses (save and eval steps that do not line up)
        raise LorakitError(f"training: {str(error).strip().splitlines()[0]}") from None


# ---------------------------------------------------------------- lorakit validate on a classify recipe


def check_classify_recipe(recipe: Recipe, findings, samples: int = 2, device: str | None = None,
                          gpu_memory: int | None = None) -> None:
    """What `lorakit classify` does before its first step, without loading weights: the tokenizer, the model's
    config and its head, the labelled rows (counts per label, what is left out), and a few rows as the head sees
    them."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from lorakit.checks.inputs import load_model_config
    from lorakit.data.classification import balanced_weights, prepare_classification_data
    from lorakit.errors import LorakitError
    from lorakit.models.classifier import load_classifier_tokenizer

    task = recipe.sections["task"]
    try:
        tokenizer = load_classifier_tokenizer(recipe.model)
    except LorakitError as error:
        findings.problem(str(error))
        tokenizer = None
    config = load_model_config(recipe, findings, report_failure=tokenizer is not None)
    if config is not None:
        if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
            findings.problem(f"model.name_or_path: transformers has no sequence-classification head for "
                             f"{config.model_type} models (AutoModelForSequenceClassification)")
        layers = recipe.lora.get("layers_to_transform")
        count = getattr(config.get_text_config(), "num_hidden_layers", None)
        wanted = [layers] if isinstance(layers, int) else list(layers or [])
        if count is not None and any(not 0 <= layer < count for layer in wanted):
            findings.problem(f"lora.layers_to_transform: the model has layers 0-{count - 1}")
    if tokenizer is None:
        return
    try:
        data = prepare_classification_data(recipe.data, task, tokenizer, recipe.training.get("seed", 42))
        if task["class_weights"] == "balanced":
            balanced_weights(data.reports["train"], data.labels)
    except LorakitError as error:
        findings.problem(str(error))
        return
    findings.ok(f"labels: {data.labels.type}, {data.labels.num_labels}: {', '.join(data.labels.names[:20])}"
                + (" ..." if data.labels.num_labels > 20 else ""))
    for key, text in task_rows(data, task, recipe):
        (findings.warning if "no rows of" in text else findings.ok)(f"{key}: {text}" if key else f"  {text}")
    show_classify_examples(tokenizer, data, samples)
    if config is not None:
        from lorakit.checks.memory import check_memory

        longest = max((len(ids) for split in (data.train, data.eval) if split is not None for ids in
                       split["input_ids"]), default=None)
        check_memory(recipe, config, None, device, gpu_memory, findings, longest=longest)


def show_classify_examples(tokenizer, data, samples: int) -> None:
    for index in range(min(samples, len(data.train))):
        row = data.train[index]
        label = row["labels"]
        shown = data.labels.names[label] if data.labels.type == "classification" else label
        text = tokenizer.decode(row["input_ids"])
        click.echo(f"\n  example {index + 1} ({len(row['input_ids'])} tokens, label {shown}):\n    "
                   + (text if len(text) <= 300 else text[:297] + "...").replace("\n", "\n    "))
    click.echo("")
