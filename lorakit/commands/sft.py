"""`lorakit sft`: recipe -> tokenizer -> data -> model -> trl.SFTTrainer -> output folder, top to bottom."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import click

from lorakit import run_dir
from lorakit.recipe import Recipe, load_recipe

OVERRIDES_HELP = "OVERRIDES are dotted recipe paths, e.g. training.learning_rate=1e-4 lora.r=8 data.max_length=512."


@click.command(epilog=OVERRIDES_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--output-dir", type=click.Path(file_okay=False), help="Where to write the run (overrides training.output_dir).")
@click.option("--overwrite", is_flag=True, help="Replace a finished or different run already in the output folder.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming an interrupted run (needs --overwrite).")
@click.option("--resume-changed", is_flag=True, help="Resume even though the recipe or data changed since the checkpoint.")
@click.option("--device", type=click.Choice(["auto", "cuda", "xla", "mps", "xpu", "cpu"]), default=None,
              help="Force a device (default: the recipe's model.device, auto).")
def command(recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool, no_resume: bool,
            resume_changed: bool, device: str | None) -> None:
    """Fine-tune a model with LoRA or QLoRA as RECIPE describes."""
    run_sft(recipe, overrides, output_dir=output_dir, overwrite=overwrite, no_resume=no_resume,
            resume_changed=resume_changed, device=device)


def run_sft(recipe_path: str, overrides: tuple[str, ...] = (), *, output_dir: str | None = None,
            overwrite: bool = False, no_resume: bool = False, resume_changed: bool = False,
            device: str | None = None) -> Path:
    from lorakit.errors import LorakitError

    if output_dir:
        overrides = (*overrides, f"training.output_dir={Path(output_dir).absolute()}")
    if no_resume and not overwrite:
        raise LorakitError("--no-resume starts the run over and so replaces the folder's checkpoints: "
                           "add --overwrite to confirm")
    recipe = load_recipe(recipe_path, overrides)
    out = recipe.output_dir
    action = run_dir.prepare_output_dir(out, recipe.fingerprint(), overwrite or resume_changed)
    if resume_changed and action == "overwrite" and not overwrite:
        action = "resume"
    if action == "overwrite":
        run_dir.clear_run(out)
    resume_from = run_dir.checkpoints(out)[-1] if action == "resume" and run_dir.checkpoints(out) else None

    quiet_upstream_logs()
    from lorakit.data import prepare_data
    from lorakit.model import choose_placement, count_parameters, load_model, load_tokenizer

    placement = choose_placement(recipe.model, device)
    click.echo(f"lorakit: loading tokenizer of {recipe.model['name_or_path']}")
    tokenizer, template_source = load_tokenizer(recipe.model)
    click.echo("lorakit: preparing data")
    data = prepare_data(recipe.data, tokenizer, seed=recipe.training.get("seed", 42))
    args = build_sft_config(recipe, placement, tokenizer)
    click.echo(f"lorakit: loading model on {placement.device} ({placement.dtype})")
    model = load_model(recipe.model, recipe.quantization, placement,
                       gradient_checkpointing=bool(args.gradient_checkpointing))

    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, peft_config=build_lora_config(recipe.lora),
                         callbacks=build_callbacks(recipe))
    trainable, total = count_parameters(trainer.model)
    steps = planned_steps(trainer)
    if trainer.is_world_process_zero():
        print_summary(recipe, placement, template_source, data, trainable, total, trainer, steps, resume_from)
        out.mkdir(parents=True, exist_ok=True)
        (out / run_dir.RECIPE_FILE).write_text(recipe.dump(), encoding="utf-8")
        run_dir.write_record(out, new_record(recipe, placement, data, trainable, total, steps))

    started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        if trainer.is_world_process_zero():
            run_dir.update_record(out, status=run_dir.FAILED, log_history=trainer.state.log_history)
        raise
    if trainer.is_world_process_zero():
        save_outputs(trainer, tokenizer, out)
        metrics = dict(result.metrics)
        if data.eval is not None:
            metrics.update(trainer.evaluate())
        run_dir.update_record(out, status=run_dir.COMPLETED, metrics=metrics, log_history=trainer.state.log_history,
                              train_seconds=round(time.time() - started, 1))
        click.echo(f"lorakit: done; adapter, tokenizer and run record in {out}")
        print_final_metrics(metrics, trainer.state.log_history)
    return out


# ---------------------------------------------------------------- building upstream objects


def build_sft_config(recipe: Recipe, placement, tokenizer) -> Any:
    """trl.SFTConfig from the recipe's training section plus what lorakit decides for this machine."""
    from trl import SFTConfig

    from lorakit.model import end_of_turn_token

    settings = dict(recipe.training)
    settings["max_length"] = recipe.data["max_length"]
    on_gpu = placement.device in ("cuda", "xpu")
    if placement.device == "cpu":
        settings["use_cpu"] = True
    if not recipe.quantization:
        settings.setdefault("bf16", placement.dtype == "bfloat16" and on_gpu)
        settings.setdefault("fp16", placement.dtype == "float16" and on_gpu)
    else:
        settings.setdefault("bf16", placement.dtype == "bfloat16")
        settings.setdefault("fp16", False)
    # Checkpointing trades ~30% speed for activation memory; on CPU memory is rarely the limit (measured 20x slower).
    settings.setdefault("gradient_checkpointing", on_gpu)
    # Packing (best-fit, padding-free) is exact with attention that separates packed sequences by position ids,
    # which flash attention and transformers' sdpa/eager masks do.
    settings.setdefault("packing", placement.attn_implementation in ("flash_attention_2", "flash_attention_3", "sdpa",
                                                                      "eager", "kernels-community/flash-attn"))
    end = end_of_turn_token(tokenizer)
    if end and end != tokenizer.eos_token:
        settings.setdefault("eos_token", end)  # generation must stop where the chat template ends a turn
    if recipe.early_stopping:
        settings.setdefault("eval_strategy", "steps")
        settings.setdefault("eval_steps", 0.1)
        settings.setdefault("save_strategy", settings["eval_strategy"])
        settings.setdefault("save_steps", settings["eval_steps"])
        settings.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    elif recipe.has_eval:
        settings.setdefault("eval_strategy", "steps")
        settings.setdefault("eval_steps", 0.25)
    settings.setdefault("per_device_eval_batch_size", settings.get("per_device_train_batch_size", 8))
    return SFTConfig(**settings)


def build_lora_config(lora: dict) -> Any:
    from peft import LoraConfig

    return LoraConfig(**lora)


def build_callbacks(recipe: Recipe) -> list:
    callbacks = []
    if recipe.early_stopping:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping["patience"],
                                               early_stopping_threshold=recipe.early_stopping["threshold"]))
    return callbacks


def quiet_upstream_logs() -> None:
    # bitsandbytes warns on import that an optional Hub-downloaded CPU kernel is missing; the fallback is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ---------------------------------------------------------------- outputs


def save_outputs(trainer, tokenizer, out: Path) -> None:
    """Adapter (safetensors), tokenizer with its chat template; checkpoints removed once the run is complete.

    trainer.save_model would also write training_args.bin (a pickle); the adapter is saved directly instead.
    """
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for checkpoint in run_dir.checkpoints(out):
        shutil.rmtree(checkpoint)


def planned_steps(trainer) -> int:
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(1, batches // args.gradient_accumulation_steps)
    return int(math.ceil(per_epoch * args.num_train_epochs))


def new_record(recipe: Recipe, placement, data, trainable: int, total: int, steps: int) -> dict:
    return {
        "status": run_dir.RUNNING,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe_fingerprint": recipe.fingerprint(),
        "base_model": {"name_or_path": recipe.model["name_or_path"], "revision": recipe.model.get("revision")},
        "versions": run_dir.library_versions(),
        "device": {"type": placement.device, "name": placement.device_name, "dtype": placement.dtype,
                   "attn_implementation": placement.attn_implementation},
        "quantization": recipe.quantization,
        "parameters": {"trainable": trainable, "total": total},
        "planned_steps": steps,
        "data": {split: report.to_dict() for split, report in data.reports.items()},
    }


def print_summary(recipe: Recipe, placement, template_source: str, data, trainable: int, total: int, trainer,
                  steps: int, resume_from: Path | None) -> None:
    args = trainer.args
    quant = recipe.quantization or {}
    if quant.get("load_in_4bit"):
        quant_text = f"4-bit {quant.get('bnb_4bit_quant_type')} (QLoRA), double quant {quant.get('bnb_4bit_use_double_quant')}"
    elif quant.get("load_in_8bit"):
        quant_text = "8-bit (LLM.int8)"
    else:
        quant_text = "none (LoRA on full-precision weights)"
    lora = recipe.lora
    rows = [
        ("model", recipe.model["name_or_path"]),
        ("device", f"{placement.device_name}, {placement.dtype}, attention {placement.attn_implementation}"),
        ("quantization", quant_text),
        ("lora", f"r={lora['r']} alpha={lora['lora_alpha']} dropout={lora['lora_dropout']} "
                 f"targets={lora['target_modules']}"),
        ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"),
        ("chat template", template_source),
    ]
    for split, report in data.reports.items():
        stats = report.length_stats()
        rows.append((f"{split} data", f"{report.rows:,} rows, {report.tokens:,} tokens "
                     f"({report.trained_tokens:,} trained); length median {stats.get('median')}, max {stats.get('max')}"))
        cut = []
        if report.truncated:
            cut.append(f"{report.truncated} truncated to {recipe.data['max_length']} tokens")
        if report.dropped_too_long:
            cut.append(f"{report.dropped_too_long} dropped as longer than {recipe.data['max_length']} tokens")
        if report.dropped_no_trained_tokens:
            cut.append(f"{report.dropped_no_trained_tokens} dropped: no trained tokens left within max_length")
        if cut:
            rows.append(("", "; ".join(cut)))
        for source in report.sources:
            rows.append(("", f"{source.name}: {source.format}, {source.used_rows:,} of {source.rows:,} rows"))
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    rows += [
        ("batch", f"{batch} sequences per step = {args.per_device_train_batch_size} per device x "
                  f"{args.gradient_accumulation_steps} accumulation x {args.world_size} process(es)"
                  + (", packed" if args.packing else "")),
        ("steps", f"{steps} optimizer steps, learning rate {args.learning_rate:g} ({scheduler})"),
        ("output", str(recipe.output_dir) + (f" (resuming from {resume_from.name})" if resume_from else "")),
    ]
    if recipe.model.get("trust_remote_code") and not recipe.model.get("revision"):
        rows.append(("warning", "trust_remote_code without model.revision: the code run can change under you; "
                                "pin a commit"))
    width = max(len(k) for k, _ in rows)
    click.secho("lorakit sft", bold=True)
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")


def print_final_metrics(metrics: dict, log_history: list[dict]) -> None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    parts = []
    if losses:
        parts.append(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['eval_loss']:.4f}")
    if "train_runtime" in metrics:
        parts.append(f"{metrics['train_runtime']:.0f} s")
    if parts:
        click.echo("lorakit: " + ", ".join(parts))
