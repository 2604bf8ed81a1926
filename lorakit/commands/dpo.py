"""`lorakit dpo`: preference tuning (DPO and trl's other pairwise losses) with LoRA or QLoRA through trl's
DPOTrainer, from a base model or on the adapter of a finished SFT run.

recipe -> start point (lorakit.models.preference_model) -> tokenizer -> pairs (lorakit.data.preferences) ->
policy and reference on one base -> DPOConfig + DPOTrainer, handed to the shared run lifecycle
(lorakit.training.lifecycle), which guards the output folder, resumes, trains and saves.
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
    """Preference-tune a model (DPO) as RECIPE describes: from a base model, or from an SFT run folder
    (model.name_or_path: runs/my-sft), whose adapter is trained further against the SFT model."""
    loaded = load_recipe(recipe, with_output_dir(overrides, options["output_dir"]), command="dpo")
    relaunch_if_distributed("dpo", recipe, overrides, loaded, options)
    run_dpo(recipe, overrides, **run_options(options))


def run_dpo(recipe_path: str, overrides: tuple[str, ...] = (), *, output_dir: str | None = None,
            overwrite: bool = False, no_resume: bool = False, resume_changed: bool = False,
            device: str | None = None) -> Path:
    from lorakit.training import lifecycle

    return lifecycle.run_recipe("dpo", recipe_path, overrides, build_dpo, output_dir=output_dir, overwrite=overwrite,
                                no_resume=no_resume, resume_changed=resume_changed, device=device)


def build_dpo(context) -> Any:
    """Start point, tokenizer, pairs, policy (+ reference) and DPOTrainer: what `lorakit dpo` trains."""
    from lorakit.data.preferences import prepare_pairs
    from lorakit.models.loading import load_tokenizer
    from lorakit.models.preference_model import (
        load_policy,
        resolve_start,
        use_chosen_reference,
    )
    from lorakit.models.trained_positions_head import score_trained_positions_only
    from lorakit.training.lifecycle import Built

    recipe, placement = context.recipe, context.placement
    preference = recipe.sections["preference"]
    start = resolve_start(recipe.model, preference)
    start.refuse_changed_start(recipe.output_dir, resuming=context.resume_from is not None)
    click.echo(f"lorakit: loading tokenizer of {start.base['name_or_path']}")
    tokenizer, template_source = load_tokenizer(start.base)
    args = build_dpo_config(recipe, placement)
    click.echo("lorakit: preparing preference pairs")
    with args.main_process_first(desc="preparing pairs"):
        data = prepare_pairs(recipe.data, tokenizer, preference["on_bad_rows"], recipe.training.get("seed", 42))
    click.echo(f"lorakit: loading model on {placement.device} ({placement.dtype})")
    model, peft_config = load_policy(start, recipe.quantization, placement, recipe.lora,
                                     gradient_checkpointing=bool(args.activation_checkpointing))
    trainer = pretokenized_dpo_trainer()(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                         processing_class=tokenizer, peft_config=peft_config,
                                         callbacks=context.callbacks)
    use_chosen_reference(trainer, start)
    # What DPOTrainer reads from its LM head besides log-probabilities (its metrics; WPO's weights); CPU only.
    score_trained_positions_only(trainer, outputs=("entropy", "mean_logits", "is_top1",
                                                   *(("log_sum_sq_probs",) if trainer.use_weighting else ())))
    summary = [*start.summary_rows(), ("chat template", template_source),
               ("loss", f"{'+'.join(args.loss_type)}, beta {args.beta:g}"), *pair_rows(data.reports, recipe)]
    return Built(trainer=trainer, tokenizer=tokenizer, has_eval=data.eval is not None, summary=summary,
                 record={**start.to_record(recipe.data),
                         "data": {split: report.to_dict() for split, report in data.reports.items()}},
                 save=save_policy)


def pretokenized_dpo_trainer() -> type:
    """trl's DPOTrainer, on pairs lorakit has tokenized already.

    DPOTrainer has no path for tokenized pairs: it would render them again, with the template's separator after
    the end-of-turn token scored and no file or row to name when a row is bad. Its one dataset hook is skipped.
    """
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def build_dpo_config(recipe: Recipe, placement) -> Any:
    """trl.DPOConfig from the recipe's training section plus what lorakit decides for this machine (as for sft)."""
    from trl import DPOConfig

    from lorakit.training.settings import eval_on_loss, machine_settings

    settings = machine_settings(recipe.training, placement, bool(recipe.quantization))
    settings["max_length"] = recipe.data["max_length"]  # the pairs are already cut to it
    eval_on_loss(settings, recipe)
    return DPOConfig(**settings)


def pair_rows(reports: dict, recipe: Recipe) -> list[tuple[str, str]]:
    """Summary rows for the pairs: counts, scored tokens, lengths, what was cut or left out, per source."""
    max_length = recipe.data["max_length"]
    rows = []
    for split, report in reports.items():
        stats = report.length_stats()
        text = (f"{report.rows:,} pairs, {report.tokens:,} tokens ({report.trained_tokens:,} scored: the responses); "
                f"longer sequence median {stats.get('median')}, max {stats.get('max')}")
        rows.append((f"{split} pairs", text))
        cut = [f"{n} {reason}" for reason, n in report.dropped_bad_rows.items()]
        if report.truncated:
            cut.append(f"{report.truncated} truncated to {max_length} tokens")
        if report.dropped_too_long:
            cut.append(f"{report.dropped_too_long} longer than {max_length} tokens")
        if report.dropped_no_trained_tokens:
            cut.append(f"{report.dropped_no_trained_tokens} whose prompt alone fills {max_length} tokens")
        if cut:
            rows.append(("", "left out or cut: " + "; ".join(cut)))
        for source in report.sources:
            rows.append(("", f"{source.name}: {source.format}, {source.used_rows:,} of {source.rows:,} rows"))
    return rows


def save_policy(trainer, out: Path) -> None:
    """As `lorakit sft` saves a run (commands/sft.save_run: the tokenizer as training used it, every stop token in
    generation_config.json), with the trained adapter alone: trl's frozen reference copy is not part of the run."""
    import copy

    from lorakit.models.inference import stop_token_ids
    from lorakit.models.preference_model import POLICY_ADAPTER

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(out, safe_serialization=True, selected_adapters=[POLICY_ADAPTER])
    tokenizer = trainer.processing_class
    tokenizer.save_pretrained(out)
    generation = copy.deepcopy(model.generation_config)
    generation.eos_token_id = stop_token_ids(tokenizer, model)
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
