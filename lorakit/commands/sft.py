"""`lorakit sft`: supervised fine-tuning with LoRA or QLoRA through trl's SFTTrainer.

recipe -> tokenizer -> data (input_ids + labels, lorakit.data) -> model -> SFTConfig + SFTTrainer, handed to the
shared run lifecycle (lorakit.training.lifecycle), which guards the output folder, resumes, trains and saves.
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
    """Fine-tune a model with LoRA or QLoRA as RECIPE describes."""
    loaded = load_recipe(recipe, with_output_dir(overrides, options["output_dir"]))
    relaunch_if_distributed("sft", recipe, overrides, loaded, options)
    run_sft(recipe, overrides, **run_options(options))


def run_sft(recipe_path: str, overrides: tuple[str, ...] = (), *, output_dir: str | None = None,
            overwrite: bool = False, no_resume: bool = False, resume_changed: bool = False,
            device: str | None = None) -> Path:
    from lorakit.training import lifecycle

    return lifecycle.run_recipe("sft", recipe_path, overrides, build_sft, output_dir=output_dir, overwrite=overwrite,
                                no_resume=no_resume, resume_changed=resume_changed, device=device)


def build_sft(context) -> Any:
    """Tokenizer, data, model and SFTTrainer: what `lorakit sft` trains."""
    from trl import SFTTrainer

    from lorakit.data import cache
    from lorakit.models.loading import load_model, load_tokenizer
    from lorakit.models.packed_attention import NAME as PER_DOCUMENT
    from lorakit.models.trained_positions_head import score_trained_positions_only
    from lorakit.training.lifecycle import Built
    from lorakit.training.summary import data_rows

    recipe, placement = context.recipe, context.placement
    click.echo(f"lorakit: loading tokenizer of {recipe.model['name_or_path']}")
    tokenizer, template_source = load_tokenizer(recipe.model)
    placement = packed_placement(recipe, placement)
    args = build_sft_config(recipe, placement, tokenizer)
    click.echo("lorakit: preparing data")
    with args.main_process_first(desc="preparing data"):  # the others then read its result from the cache
        data, cache_folder, cached = cache.prepare_data(recipe.data, tokenizer, recipe.training.get("seed", 42),
                                                        context.fingerprint.data)
    if cache_folder is not None:
        click.echo(f"lorakit: data {'reused from the cache' if cached else 'prepared and cached'}: {cache_folder}")
    click.echo(f"lorakit: loading model on {placement.device} ({placement.dtype})")
    model = load_model(recipe.model, recipe.quantization, placement,
                       gradient_checkpointing=bool(args.activation_checkpointing))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, peft_config=build_lora_config(recipe.lora),
                         callbacks=context.callbacks)
    score_trained_positions_only(trainer, outputs=("entropy", "is_top1"))  # what SFTTrainer logs; CPU only
    return Built(trainer=trainer, tokenizer=tokenizer, has_eval=data.eval is not None,
                 save=lambda trainer, out: save_run(trainer, tokenizer, out),
                 summary=[("chat template", template_source), *data_rows(data.reports, recipe.data["max_length"]),
                          *([("packing", "packed rows attend document by document (one causal SDPA pass each)")]
                            if placement.attn_implementation == PER_DOCUMENT else [])],
                 record={"data": {split: report.to_dict() for split, report in data.reports.items()}})


def save_run(trainer, tokenizer, out: Path) -> None:
    """Adapter and tokenizer as every run saves them, and generation_config.json listing every stop token.

    The tokenizer is saved as training used it: its EOS is not replaced by the end-of-turn token (a template that
    writes `{{ eos_token }}` would render differently). Where a reply ends goes where the ecosystem looks for it,
    a list of `eos_token_id`s in generation_config.json, as Llama 3 ships it.
    """
    import copy

    from lorakit.models.inference import stop_token_ids
    from lorakit.training.lifecycle import save_adapter

    save_adapter(trainer, tokenizer, out)
    model = trainer.model
    generation = copy.deepcopy(model.generation_config)
    generation.eos_token_id = stop_token_ids(tokenizer, model)
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)


def packed_placement(recipe: Recipe, placement):
    """The placement to train packed rows with: on a CPU with SDPA, lorakit's per-document attention
    (lorakit.models.packed_attention), so that a packed row costs what its documents cost."""
    import dataclasses

    from lorakit.models import packed_attention

    if not packed_attention.use_per_document_attention(recipe.training.get("packing"), placement):
        return placement
    return dataclasses.replace(placement, attn_implementation=packed_attention.register())


def build_sft_config(recipe: Recipe, placement, tokenizer) -> Any:
    """trl.SFTConfig from the recipe's training section plus what lorakit decides for this machine."""
    from trl import SFTConfig

    from lorakit.models.loading import PACKABLE_ATTENTION
    from lorakit.models.packed_attention import NAME as PER_DOCUMENT
    from lorakit.training.settings import eval_on_loss, machine_settings

    settings = machine_settings(recipe.training, placement, bool(recipe.quantization))
    settings["max_length"] = recipe.data["max_length"]
    # Packing (best-fit, padding-free) only where variable-length attention kernels make it cheap; elsewhere,
    # batches of similar lengths waste little on padding without the quadratic cost of one long packed row.
    settings.setdefault("packing", placement.attn_implementation in PACKABLE_ATTENTION)
    if not settings["packing"]:
        settings.setdefault("train_sampling_strategy", "group_by_length")
    eval_on_loss(settings, recipe)
    # Packed without variable-length kernels, trl flattens a micro-batch into one row whose block-diagonal attention
    # is computed whole: quadratic in the micro-batch's total length. On a CPU, lorakit's per-document attention
    # (packed_placement) keeps that one row and computes each document's attention alone: 1.54-1.74x the tokens/s
    # of the fastest peer's packing, 4x trl's, same loss (docs/benchmarks.md). Elsewhere (eager, or SDPA on an
    # accelerator without flash attention), one packed row per forward pass, accumulated into the same optimizer
    # step, gives the same gradients (the loss is normalized over the step's tokens) for a fraction of the attention.
    rows = settings.get("per_device_train_batch_size", 8)
    if settings["packing"] and placement.attn_implementation not in (*PACKABLE_ATTENTION, PER_DOCUMENT) and rows > 1:
        settings["per_device_train_batch_size"] = 1
        settings["gradient_accumulation_steps"] = settings.get("gradient_accumulation_steps", 1) * rows
    return SFTConfig(**settings)


def build_lora_config(lora: dict) -> Any:
    from peft import LoraConfig

    return LoraConfig(**lora)
