"""The run lifecycle every training command shares: one function, `run`, from a validated recipe to a finished
output folder.

A command (sft, dpo, classify) hands `run` its recipe and a `build` function that makes "what to train": the
tokenizer, the data, the model and a transformers/trl Trainer with the callbacks it is given. Everything around
that is here, once:

    guard the output folder (refuse to lose work; resume, overwrite or start new)
    -> find the resume point (newest complete checkpoint)
    -> choose the placement (device, dtype, attention)
    -> build(context)                                   the command's own part
    -> summary screen, resolved recipe, run record
    -> train under the guards (stop signals, divergence, complete checkpoints, out of memory)
    -> final evaluation, save adapter + tokenizer, record the metrics
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from lorakit.errors import LorakitError, OutOfMemory, RunInterrupted, TrainingDiverged, TrainingStalled
from lorakit.recipe.sections import Recipe
from lorakit.training import run_dir
from lorakit.training.launch import is_main_process


@dataclass
class RunContext:
    """What the lifecycle knows when the command builds its trainer."""

    recipe: Recipe
    placement: Any  # lorakit.models.loading.Placement
    fingerprint: run_dir.Fingerprint
    callbacks: list  # lorakit's guards; the command passes them to its Trainer
    resume_from: Path | None


@dataclass
class Built:
    """What a command's `build` returns: a trainer ready to train, and what only the command can say about it."""

    trainer: Any
    tokenizer: Any  # the processing class, saved beside the adapter
    summary: list[tuple[str, str]] = field(default_factory=list)  # rows of the summary screen (data, template...)
    record: dict[str, Any] = field(default_factory=dict)  # fields of the run record (data reports...)
    has_eval: bool = False
    save: Callable[[Any, Path], None] | None = None  # writes the outputs; default: adapter + tokenizer


def run_recipe(command: str, recipe_path: str | os.PathLike, overrides: tuple[str, ...],
               build: Callable[[RunContext], Built], *, output_dir: str | None = None, overwrite: bool = False,
               no_resume: bool = False, resume_changed: bool = False, device: str | None = None,
               callbacks: tuple = ()) -> Path:
    """Load the recipe file for `command` (with overrides and --output-dir) and `run` it."""
    from lorakit.recipe.load import load_recipe, with_output_dir

    check_options(overwrite, no_resume)
    recipe = load_recipe(recipe_path, with_output_dir(overrides, output_dir), command=command)
    return run(recipe, build, overwrite=overwrite, no_resume=no_resume, resume_changed=resume_changed, device=device,
               callbacks=callbacks)


def check_options(overwrite: bool, no_resume: bool) -> None:
    if no_resume and not overwrite:
        raise LorakitError("--no-resume starts the run over and so replaces the folder's checkpoints: "
                           "add --overwrite to confirm")


def run(recipe: Recipe, build: Callable[[RunContext], Built], *, overwrite: bool = False, no_resume: bool = False,
        resume_changed: bool = False, device: str | None = None, callbacks: tuple = ()) -> Path:
    """Train what `build` makes, with every guarantee of a lorakit run; return the output folder.

    `callbacks` are trainer callbacks of the caller's (a sweep's pruning, say), run after lorakit's guards.
    Before anything is loaded: the output folder must be writable, the LoRA targets must exist in the model;
    then the folder is locked for the whole run (a second run into it is refused), and a full disk ends the run
    in one message with the last complete checkpoint kept.
    """
    from contextlib import nullcontext

    from lorakit.checks.modules import check_target_modules
    from lorakit.training import disk
    from lorakit.training.folder_lock import hold_lock

    check_options(overwrite, no_resume)
    refuse_unsafe_settings(recipe)
    out = recipe.output_dir
    disk.check_writable(out)
    from lorakit.models.loading import reach_hub_or_cache

    reach_hub_or_cache(recipe.model)  # an unreachable Hub: the cache, or one message now instead of minutes of retries
    check_target_modules(recipe)
    for warning in recipe.warnings:
        click.echo(f"lorakit: warning: {warning}", err=True)
    main_process = is_main_process()  # the one process that locks, deletes and records
    with hold_lock(out, f"lorakit {recipe.command}") if main_process else nullcontext():
        try:
            return run_locked(recipe, build, overwrite=overwrite, no_resume=no_resume, resume_changed=resume_changed,
                              device=device, callbacks=callbacks)
        except Exception as error:
            full = disk.disk_full(error, out) if main_process else None
            if full is None:
                raise
            raise full from None
        finally:
            if main_process:
                run_dir.record_outputs(out)


def run_locked(recipe: Recipe, build: Callable[[RunContext], Built], *, overwrite: bool, no_resume: bool,
               resume_changed: bool, device: str | None, callbacks: tuple) -> Path:
    """The run itself, with its output folder locked."""
    from lorakit.data import cache
    from lorakit.models.loading import choose_placement, count_parameters, quiet_upstream_logs
    from lorakit.training import allocator, guards, threads

    check_options(overwrite, no_resume)
    refuse_unsafe_settings(recipe)
    out = recipe.output_dir
    from lorakit.checks.inputs import cap_to_position_limit

    capped = cap_to_position_limit(recipe)  # rows longer than the model's positions are cut at its limit
    if capped:
        click.echo(f"lorakit: {'' if capped.startswith('data.max_length: ') else 'warning: '}{capped}", err=True)
    fingerprint = run_dir.Fingerprint(recipe.fingerprint(), cache.source_fingerprints(recipe.data),
                                      settings=recipe.weight_settings())
    action = run_dir.prepare_output_dir(out, fingerprint, overwrite, resume_changed=resume_changed,
                                        no_resume=no_resume)
    # Before the trainer exists, the launcher's RANK says which process may delete (every process decides alike).
    main_process = is_main_process()
    if action == "overwrite" and main_process:
        run_dir.clear_run(out)
    resume_from = find_resume_point(out, main_process) if action == "resume" else None
    if resume_from is not None and resume_changed:
        refuse_changed_adapter_shape(resume_from, recipe.lora)

    quiet_upstream_logs()
    placement = choose_placement(recipe.model, device)
    callbacks = (*callbacks, *threads.follow_free_cores(placement))  # CPU: train on the cores others leave free
    allocator.keep_freed_memory(placement.device)  # CPU: no page faults re-fetching each step's memory
    stop = guards.StopOnSignal()
    built = build(RunContext(recipe, placement, fingerprint, [*build_callbacks(recipe, stop), *callbacks], resume_from))
    trainer = built.trainer
    from lorakit.models.cpu_passes import use_fewer_passes
    from lorakit.training import plots, progress

    fewer_passes = use_fewer_passes(trainer.model, placement)  # CPU float32: element-wise work in fewer passes

    progress.replace_progress_bar(trainer, progress.Progress())  # one readable line per log, not raw dicts
    trainable, total = count_parameters(trainer.model)
    steps = planned_steps(trainer)
    if trainer.is_world_process_zero():
        from lorakit.training.summary import print_summary

        rows = [*built.summary, *progress.memory_estimate_row(recipe, placement, trainer.model, built.record),
                *([("fewer passes", ", ".join(fewer_passes.names))] if fewer_passes.names else [])]
        print_summary(recipe, placement, rows, trainable, total, trainer, steps, resume_from)
        out.mkdir(parents=True, exist_ok=True)
        (out / run_dir.RECIPE_FILE).write_text(recipe.dump(), encoding="utf-8")
        run_dir.write_record(out, new_record(recipe, fingerprint, placement, built.record, trainable, total, steps,
                                             resume_from))

    started = time.time()
    with stop, fewer_passes:  # a stop signal from here on waits for the step to end, and then for its checkpoint
        try:
            result = guards.train(trainer, resume_from, recipe,
                                  retry_smaller_batch=bool(recipe.training.get("auto_find_batch_size")))
        except BaseException as error:
            if trainer.is_world_process_zero():
                run_dir.update_record(out, status=run_dir.FAILED, failure=describe_failure(error),
                                      log_history=trainer.state.log_history)
                plots.write_loss_plot(out, trainer.state.log_history, f"{out.name} (failed)")
            raise
        if stop.stopped_at_step is not None and trainer.state.global_step < trainer.state.max_steps:
            checkpoint = f"checkpoint-{trainer.state.global_step}"
            if trainer.is_world_process_zero():
                run_dir.update_record(out, status=run_dir.INTERRUPTED, log_history=trainer.state.log_history,
                                      interrupted={"signal": stop.signal_name, "step": trainer.state.global_step,
                                                   "checkpoint": checkpoint})
                plots.write_loss_plot(out, trainer.state.log_history, f"{out.name} (interrupted at step "
                                      f"{trainer.state.global_step})")
            raise RunInterrupted(
                f"stopped by {stop.signal_name} at step {trainer.state.global_step} of {trainer.state.max_steps}; "
                f"{checkpoint} saved in {out}. Run the same command again to resume from it.")
        metrics = dict(result.metrics)
        if built.has_eval:
            metrics.update(trainer.evaluate())  # every process takes part, or the others would wait forever
        if trainer.is_world_process_zero():
            if built.save is not None:
                built.save(trainer, out)
            else:
                save_adapter(trainer, built.tokenizer, out)
            run_dir.remove_checkpoints(out)
            run_dir.update_record(out, status=run_dir.COMPLETED, metrics=metrics,
                                  log_history=trainer.state.log_history, train_seconds=round(time.time() - started, 1))
            plot = plots.write_loss_plot(out, trainer.state.log_history, out.name)
            from lorakit.hub.card import write_card

            write_card(out)  # lorakit's card in place of trl's, naming the base by Hub id (push rebuilds it)
            click.echo(f"lorakit: done; adapter, tokenizer, run record, model card{' and loss.png' if plot else ''} "
                       f"in {out}")
            click.echo(progress.final_line(metrics, trainer.state.log_history,
                                           progress.measured_peak_memory(placement.device)))
    return out


# ---------------------------------------------------------------- before training


def refuse_unsafe_settings(recipe: Recipe) -> None:
    """Settings that would leak a secret, fight lorakit's own resume and signal handling, or load pickled weights."""
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


def find_resume_point(out: Path, main_process: bool = True) -> Path | None:
    """The newest complete checkpoint; checkpoints whose save was cut short are deleted (by the main process)."""
    from lorakit.training import checkpoint_check

    if not main_process:
        return checkpoint_check.latest_sound_checkpoint(out)
    for name in run_dir.remove_incomplete_checkpoints(out):
        click.echo(f"lorakit: {name} was not completely saved (the run stopped while writing it): removed")
    for name, damage in checkpoint_check.remove_damaged_checkpoints(out):
        click.echo(f"lorakit: warning: {name} is damaged ({damage}): removed; falling back to the checkpoint "
                   "before it", err=True)
    resume_from = run_dir.latest_complete_checkpoint(out)
    if resume_from is None:
        click.echo(f"lorakit: {out} holds an unfinished run without a complete checkpoint: starting from step 0")
    else:
        click.echo(f"lorakit: resuming from {resume_from.name} (model, optimizer, scheduler, RNG and data position)")
    return resume_from


def refuse_changed_adapter_shape(checkpoint: Path, lora: dict) -> None:
    """--resume-changed cannot change the adapter's rank: the saved weights would not fit the new shapes."""
    import json

    saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    if saved.get("r") != lora["r"]:
        raise LorakitError(f"lora.r: {checkpoint.name} was trained with r={saved.get('r')} and the recipe now says "
                           f"r={lora['r']}; a resumed adapter keeps its shape. Set lora.r={saved.get('r')}, or start "
                           "over with --no-resume --overwrite")


def build_callbacks(recipe: Recipe, stop) -> list:
    """lorakit's guards (in this order: the checkpoint marker looks at the save the signal guard asks for),
    then early stopping when the recipe asks."""
    from lorakit.training import guards

    callbacks = [guards.StopOnDivergence(), guards.StopOnStall(), stop,
                 guards.MarkCompleteCheckpoints(keep=recipe.training.get("save_total_limit"))]
    if recipe.early_stopping:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping["patience"],
                                               early_stopping_threshold=recipe.early_stopping["threshold"]))
    return callbacks


def planned_steps(trainer) -> int:
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(1, batches // args.gradient_accumulation_steps)
    return int(math.ceil(per_epoch * args.num_train_epochs))


# ---------------------------------------------------------------- the run record and the outputs


def new_record(recipe: Recipe, fingerprint, placement, command_record: dict, trainable: int, total: int, steps: int,
               resume_from: Path | None) -> dict:
    return {
        "status": run_dir.RUNNING,
        "command": recipe.command,
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
        **command_record,
    }


def describe_failure(error: BaseException) -> dict:
    reasons = {TrainingStalled: "stalled", TrainingDiverged: "diverged", OutOfMemory: "out of memory"}
    reason = next((text for kind, text in reasons.items() if isinstance(error, kind)), type(error).__name__)
    lines = str(error).strip().splitlines()
    return {"reason": reason, "message": lines[0][:500] if lines else reason}


def save_adapter(trainer, tokenizer, out: Path) -> None:
    """Adapter (safetensors) and tokenizer with its chat template.

    trainer.save_model would also write training_args.bin (a pickle); the adapter is saved directly instead.
    """
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
