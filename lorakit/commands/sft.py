"""`lorakit sft`: recipe -> tokenizer -> data -> model -> trl.SFTTrainer -> output folder, top to bottom."""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from lorakit.training import run_dir
from lorakit.recipe.sections import Recipe
from lorakit.recipe.load import load_recipe

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
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="Processes to launch through accelerate (one per GPU); same as launch.num_processes.")
@click.option("--accelerate-config", type=click.Path(dir_okay=False), default=None,
              help="accelerate config (DDP, FSDP, DeepSpeed: recipes/accelerate/); same as launch.accelerate_config.")
@click.option("--num-machines", type=click.IntRange(min=1), default=None, help="Nodes, for a multi-node launch.")
@click.option("--machine-rank", type=click.IntRange(min=0), default=None, help="This node's rank (multi-node).")
@click.option("--main-process-ip", default=None, help="Address of the rank-0 node (multi-node).")
@click.option("--main-process-port", type=int, default=None, help="Port of the rank-0 node (multi-node).")
def command(recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool, no_resume: bool,
            resume_changed: bool, device: str | None, num_processes: int | None, accelerate_config: str | None,
            num_machines: int | None, machine_rank: int | None, main_process_ip: str | None,
            main_process_port: int | None) -> None:
    """Fine-tune a model with LoRA or QLoRA as RECIPE describes."""
    from lorakit.training import launch

    if not launch.already_launched():
        settings = load_recipe(recipe, overrides).launch or {}
        num_processes = num_processes or settings.get("num_processes")
        accelerate_config = accelerate_config or settings.get("accelerate_config")
        if (num_processes or 1) > 1 or accelerate_config or (num_machines or 1) > 1:
            sft_args = [recipe, *overrides, *(["--output-dir", output_dir] if output_dir else []),
                        *(["--overwrite"] if overwrite else []), *(["--no-resume"] if no_resume else []),
                        *(["--resume-changed"] if resume_changed else []), *(["--device", device] if device else [])]
            line = launch.launch_command(sft_args, num_processes, accelerate_config, num_machines, machine_rank,
                                         main_process_ip, main_process_port)
            click.echo("lorakit: " + shlex.join(line))
            sys.exit(launch.relaunch(line))
    run_sft(recipe, overrides, output_dir=output_dir, overwrite=overwrite, no_resume=no_resume,
            resume_changed=resume_changed, device=device)


def run_sft(recipe_path: str, overrides: tuple[str, ...] = (), *, output_dir: str | None = None,
            overwrite: bool = False, no_resume: bool = False, resume_changed: bool = False,
            device: str | None = None) -> Path:
    from lorakit.data import cache
    from lorakit.training import guards
    from lorakit.errors import LorakitError

    if output_dir:
        overrides = (*overrides, f"training.output_dir={Path(output_dir).absolute()}")
    if no_resume and not overwrite:
        raise LorakitError("--no-resume starts the run over and so replaces the folder's checkpoints: "
                           "add --overwrite to confirm")
    recipe = load_recipe(recipe_path, overrides)
    refuse_unsafe_settings(recipe)
    out = recipe.output_dir
    fingerprint = run_dir.Fingerprint(recipe.fingerprint(), cache.source_fingerprints(recipe.data))
    action = run_dir.prepare_output_dir(out, fingerprint, overwrite, resume_changed=resume_changed,
                                        no_resume=no_resume)
    # Before the trainer exists, the launcher's RANK says which process may delete (every process decides alike).
    main_process = int(os.environ.get("RANK", "0")) == 0
    if action == "overwrite" and main_process:
        run_dir.clear_run(out)
    resume_from = find_resume_point(out, main_process) if action == "resume" else None
    if resume_from is not None and resume_changed:
        refuse_changed_adapter_shape(resume_from, recipe.lora)

    from lorakit.models.loading import choose_placement, count_parameters, load_model, load_tokenizer, quiet_upstream_logs

    quiet_upstream_logs()

    placement = choose_placement(recipe.model, device)
    click.echo(f"lorakit: loading tokenizer of {recipe.model['name_or_path']}")
    tokenizer, template_source = load_tokenizer(recipe.model)
    args = build_sft_config(recipe, placement, tokenizer)
    click.echo("lorakit: preparing data")
    with args.main_process_first(desc="preparing data"):  # the others then read its result from the cache
        data, cache_folder, cached = cache.prepare_data(recipe.data, tokenizer, recipe.training.get("seed", 42),
                                                        fingerprint.data)
    if cache_folder is not None:
        click.echo(f"lorakit: data {'reused from the cache' if cached else 'prepared and cached'}: {cache_folder}")
    click.echo(f"lorakit: loading model on {placement.device} ({placement.dtype})")
    model = load_model(recipe.model, recipe.quantization, placement,
                       gradient_checkpointing=bool(args.activation_checkpointing))

    from trl import SFTTrainer

    stop = guards.StopOnSignal()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, peft_config=build_lora_config(recipe.lora),
                         callbacks=build_callbacks(recipe, stop))
    trainable, total = count_parameters(trainer.model)
    steps = planned_steps(trainer)
    if trainer.is_world_process_zero():
        print_summary(recipe, placement, template_source, data, trainable, total, trainer, steps, resume_from)
        out.mkdir(parents=True, exist_ok=True)
        (out / run_dir.RECIPE_FILE).write_text(recipe.dump(), encoding="utf-8")
        run_dir.write_record(out, new_record(recipe, fingerprint, placement, data, trainable, total, steps,
                                             resume_from))

    started = time.time()
    with stop:  # a stop signal from here on waits for the step to end, and then for its checkpoint
        try:
            result = guards.train(trainer, resume_from, recipe,
                                  retry_smaller_batch=bool(recipe.training.get("auto_find_batch_size")))
        except BaseException as error:
            if trainer.is_world_process_zero():
                run_dir.update_record(out, status=run_dir.FAILED, failure=describe_failure(error),
                                      log_history=trainer.state.log_history)
            raise
        if stop.stopped_at_step is not None and trainer.state.global_step < trainer.state.max_steps:
            checkpoint = f"checkpoint-{trainer.state.global_step}"
            if trainer.is_world_process_zero():
                run_dir.update_record(out, status=run_dir.INTERRUPTED, log_history=trainer.state.log_history,
                                      interrupted={"signal": stop.signal_name, "step": trainer.state.global_step,
                                                   "checkpoint": checkpoint})
            raise guards.RunInterrupted(
                f"stopped by {stop.signal_name} at step {trainer.state.global_step} of {trainer.state.max_steps}; "
                f"{checkpoint} saved in {out}. Run the same command again to resume from it.")
        metrics = dict(result.metrics)
        if data.eval is not None:
            metrics.update(trainer.evaluate())  # every process takes part, or the others would wait forever
        if trainer.is_world_process_zero():
            save_outputs(trainer, tokenizer, out)
            run_dir.update_record(out, status=run_dir.COMPLETED, metrics=metrics,
                                  log_history=trainer.state.log_history, train_seconds=round(time.time() - started, 1))
            click.echo(f"lorakit: done; adapter, tokenizer and run record in {out}")
            print_final_metrics(metrics, trainer.state.log_history)
    return out


def find_resume_point(out: Path, main_process: bool = True) -> Path | None:
    """The newest complete checkpoint; checkpoints whose save was cut short are deleted (by the main process)."""
    if not main_process:
        return run_dir.latest_complete_checkpoint(out)
    for name in run_dir.remove_incomplete_checkpoints(out):
        click.echo(f"lorakit: {name} was not completely saved (the run stopped while writing it): removed")
    resume_from = run_dir.latest_complete_checkpoint(out)
    if resume_from is None:
        click.echo(f"lorakit: {out} holds an unfinished run without a complete checkpoint: starting from step 0")
    else:
        click.echo(f"lorakit: resuming from {resume_from.name} (model, optimizer, scheduler, RNG and data position)")
    return resume_from


def refuse_changed_adapter_shape(checkpoint: Path, lora: dict) -> None:
    """--resume-changed cannot change the adapter's rank: the saved weights would not fit the new shapes."""
    import json

    from lorakit.errors import LorakitError

    saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    if saved.get("r") != lora["r"]:
        raise LorakitError(f"lora.r: {checkpoint.name} was trained with r={saved.get('r')} and the recipe now says "
                           f"r={lora['r']}; a resumed adapter keeps its shape. Set lora.r={saved.get('r')}, or start "
                           "over with --no-resume --overwrite")


def describe_failure(error: BaseException) -> dict:
    from lorakit.training import guards

    reasons = {guards.TrainingDiverged: "diverged", guards.OutOfMemory: "out of memory"}
    reason = next((text for kind, text in reasons.items() if isinstance(error, kind)), type(error).__name__)
    lines = str(error).strip().splitlines()
    return {"reason": reason, "message": lines[0][:500] if lines else reason}


# ---------------------------------------------------------------- settings lorakit refuses


def refuse_unsafe_settings(recipe: Recipe) -> None:
    """Settings that would leak a secret, fight lorakit's own resume and signal handling, or load pickled weights."""
    from lorakit.errors import LorakitError

    training = recipe.training
    if training.get("hub_token"):
        # The Trainer pickles its arguments into every checkpoint (training_args.bin), token included; recipes
        # and command lines also end up in version control and shell history.
        raise LorakitError("training.hub_token: lorakit takes no tokens in recipes or on the command line; "
                           "set the HF_TOKEN environment variable (or run `hf auth login`) instead")
    if training.get("resume_from_checkpoint"):
        raise LorakitError("training.resume_from_checkpoint: lorakit resumes by itself from the output folder's "
                           "last complete checkpoint when the same command is run again; remove this key")
    if training.get("enable_jit_checkpoint"):
        raise LorakitError("training.enable_jit_checkpoint: lorakit always saves a checkpoint on SIGTERM or "
                           "SIGINT (see docs/reliability.md); remove this key")
    folder = Path(recipe.model["name_or_path"])
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise LorakitError(f"model.name_or_path: {folder} holds weights only as pickle files ({pickled[0]}), "
                               "which can run code when loaded; lorakit loads safetensors only. Convert them "
                               "once, where you trust the files, with save_pretrained(..., safe_serialization=True)")


# ---------------------------------------------------------------- building upstream objects


def build_sft_config(recipe: Recipe, placement, tokenizer) -> Any:
    """trl.SFTConfig from the recipe's training section plus what lorakit decides for this machine."""
    from trl import SFTConfig

    from lorakit.models.loading import PACKABLE_ATTENTION, end_of_turn_token

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
    # `gradient_checkpointing` is transformers' deprecated alias of `activation_checkpointing`; a recipe may use either.
    alias = settings.pop("gradient_checkpointing", None)
    settings.setdefault("activation_checkpointing", on_gpu if alias is None else alias)
    # Packing (best-fit, padding-free) only where variable-length attention kernels make it cheap; elsewhere,
    # batches of similar lengths waste little on padding without the quadratic cost of one long packed row.
    settings.setdefault("packing", placement.attn_implementation in PACKABLE_ATTENTION)
    if not settings["packing"]:
        settings.setdefault("train_sampling_strategy", "group_by_length")
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
    # lorakit prunes checkpoints itself, and only once a newer one is complete (guards.MarkCompleteCheckpoints).
    settings.pop("save_total_limit", None)
    # lorakit's retry keeps the global batch (guards.train); transformers' own would shrink it 10% per retry.
    settings.pop("auto_find_batch_size", None)
    # A NaN loss is a failure to report (guards.StopOnDivergence), not a value to smooth over in the log.
    settings.setdefault("logging_nan_inf_filter", False)
    # Every LoRA weight takes part in every step; looking for unused ones costs a graph traversal per step.
    settings.setdefault("ddp_find_unused_parameters", False)
    return SFTConfig(**settings)


def build_lora_config(lora: dict) -> Any:
    from peft import LoraConfig

    return LoraConfig(**lora)


def build_callbacks(recipe: Recipe, stop) -> list:
    """lorakit's guards (in this order: the checkpoint marker looks at the save the signal guard asks for),
    then early stopping when the recipe asks."""
    from lorakit.training import guards

    callbacks = [guards.StopOnDivergence(), stop,
                 guards.MarkCompleteCheckpoints(keep=recipe.training.get("save_total_limit"))]
    if recipe.early_stopping:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping["patience"],
                                               early_stopping_threshold=recipe.early_stopping["threshold"]))
    return callbacks




# ---------------------------------------------------------------- outputs


def save_outputs(trainer, tokenizer, out: Path) -> None:
    """Adapter (safetensors), tokenizer with its chat template; checkpoints removed once the run is complete.

    trainer.save_model would also write training_args.bin (a pickle); the adapter is saved directly instead.
    """
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    run_dir.remove_checkpoints(out)


def planned_steps(trainer) -> int:
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(1, batches // args.gradient_accumulation_steps)
    return int(math.ceil(per_epoch * args.num_train_epochs))


def new_record(recipe: Recipe, fingerprint, placement, data, trainable: int, total: int, steps: int,
               resume_from: Path | None) -> dict:
    return {
        "status": run_dir.RUNNING,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": resume_from.name if resume_from else None,
        **fingerprint.to_record(),
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
