"""Peak memory and optimizer steps of a run, estimated from the model's config and the tokenized data."""

from __future__ import annotations

from pathlib import Path

import click

from lorakit.checks.findings import Findings
from lorakit.recipe.sections import Recipe

TIGHT_FIT = 0.9  # an estimate above this share of the GPU's memory leaves no room for the estimate's error
GPU_SIZES_GIB = (16, 24, 40, 48, 80, 141)  # common cards, to say what an estimate fits on

# ---------------------------------------------------------------- memory and steps


def check_memory(recipe: Recipe, config, data, device: str | None, gpu_memory: int | None,
                 findings: Findings, longest: int | None = None) -> None:
    """The estimated peak for the device the run will use, part by part, and whether it fits the GPU. `longest`:
    tokens in the longest row, where `data`'s reports do not count lengths."""
    from lorakit.training.memory import GIB, estimate_recipe_memory, format_size

    device = device or recipe.model.get("device", "auto")
    if recipe.training.get("use_cpu"):
        device = "cpu"
    note = None
    if device == "auto" and gpu_memory is None:
        from lorakit.models.loading import choose_device

        device = choose_device("auto")  # what the training command would run on here
        if device == "cpu":
            note = (f"this machine has no GPU, so the estimate is for a run on its CPU, as `lorakit {recipe.command}` "
                    "would run here; --device cuda or --gpu-memory SIZE estimates for a GPU")
    click.secho("memory (estimate)", bold=True)
    if note:
        click.echo(f"  {note}")
    if config is None:
        click.echo("  not estimated: the model's config did not load")
        return
    if longest is None and data is not None:
        longest = max((r.length_stats().get("max", 0) for r in data.reports.values()), default=None)
    try:
        estimate, setup = estimate_recipe_memory(recipe, config, "cpu" if device == "cpu" else "cuda", longest)
    except ValueError as error:  # peft refusing the recipe's LoRA for this model (a target it does not have, ...)
        findings.problem(f"lora: peft cannot apply this LoRA to {recipe.model['name_or_path']}: "
                         f"{str(error).strip().splitlines()[0]}")
        return
    except Exception as error:  # a model transformers cannot build from its config alone: say so, go on
        findings.warning(f"memory not estimated: {type(error).__name__}: {str(error).strip()[:300]}")
        return
    where = "CPU RAM" if setup.device == "cpu" else "each GPU" if setup.processes > 1 else "one GPU"
    quant = {"4bit": "QLoRA 4-bit", "8bit": "LoRA on 8-bit weights"}.get(setup.quantization, "LoRA")
    sharded = {"all": " sharding weights and LoRA state (FSDP, ZeRO-3)",
               "states": " sharding LoRA state (ZeRO-2)"}.get(setup.sharding, "")
    sharded = f", {setup.processes} processes{sharded}" if setup.processes > 1 else ""
    # A DPO step puts the chosen and the rejected sequence of each pair through the model together.
    pairs = f" ({setup.micro_batch // 2} pairs, chosen and rejected)" if recipe.command == "dpo" else ""
    click.echo(f"  peak on {where}: {quant}, {setup.dtype}, micro-batch {setup.micro_batch}{pairs} x {setup.seq_len} "
               f"tokens, activation checkpointing {'on' if setup.gradient_checkpointing else 'off'}{sharded}")
    for label, size in estimate.parts():
        if size:
            click.echo(f"    {label:<32} {format_size(size):>10}")
    click.echo(f"    {'total':<32} {format_size(estimate.total):>10}")
    if setup.device == "cpu":
        check_cpu_ram(estimate.total, setup.processes, findings)
        return
    if gpu_memory is None:
        gpu_memory = local_gpu_memory()
    if gpu_memory is None:
        fits = [f"{size} GiB" for size in GPU_SIZES_GIB if estimate.total <= TIGHT_FIT * size * GIB]
        click.echo(f"  fits GPUs of {', '.join(fits) if fits else 'none of the common sizes (up to 141 GiB)'}; "
                   "--gpu-memory SIZE checks a given card")
        return
    limit = format_size(gpu_memory)
    if estimate.total > gpu_memory:
        findings.problem(f"memory: the estimated peak, {format_size(estimate.total)}, does not fit in {limit} of GPU "
                         f"memory. Lower training.per_device_train_batch_size (and raise gradient_accumulation_steps "
                         f"to keep the batch) or data.max_length{advice(setup)}")
    elif estimate.total > TIGHT_FIT * gpu_memory:
        findings.warning(f"memory: the estimated peak, {format_size(estimate.total)}, is within 10% of {limit}; the "
                         "estimate's own error could make the run run out of memory")
    else:
        findings.ok(f"memory: the estimated peak, {format_size(estimate.total)}, fits in {limit}")


def check_cpu_ram(per_process: int, processes: int, findings: Findings) -> None:
    """Processes training on one CPU each hold the libraries, the model and their activations in the same RAM."""
    from lorakit.training.memory import format_size

    total = per_process * processes
    if processes > 1:
        click.echo(f"    {f'x {processes} processes, one RAM':<32} {format_size(total):>10}")
    ram = machine_ram()
    if ram is not None and total > ram:
        fewer = " or fewer processes (--num-processes)" if processes > 1 else ""
        findings.warning(f"memory: the estimated peak, {format_size(total)}, is more than this machine's "
                         f"{format_size(ram)} of RAM: the run would swap or be stopped. Lower "
                         f"training.per_device_train_batch_size or data.max_length{fewer}")


def machine_ram() -> int | None:
    """Physical RAM, capped by a cgroup memory limit (containers); None where it cannot be read."""
    import os

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            ram = min(ram, int(limit))
    except OSError:
        pass
    return ram


def advice(setup) -> str:
    more = []
    if not setup.gradient_checkpointing:
        more.append("turn on training.activation_checkpointing")
    if setup.quantization is None:
        more.append("use QLoRA (quantization: {load_in_4bit: true})")
    return "; or " + " or ".join(more) if more else ""


def local_gpu_memory() -> int | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def report_steps(recipe: Recipe, data) -> None:
    from lorakit.training.memory import estimate_steps, read_launch, training_setup

    training = recipe.training
    if data is None:
        if training.get("max_steps", -1) > 0:
            click.echo(f"steps: {training['max_steps']} optimizer steps (training.max_steps)")
        else:
            click.echo("steps: not counted: the data did not load")
        return
    launch = read_launch(recipe)
    setup, packing = training_setup(recipe, "cuda", launch)
    accumulation = training.get("gradient_accumulation_steps") or 1
    report = data.reports["train"]
    steps = estimate_steps(rows=report.rows, tokens=report.tokens, micro_batch=setup.micro_batch,
                           gradient_accumulation=accumulation, processes=launch.processes,
                           epochs=training.get("num_train_epochs", 1), max_steps=training.get("max_steps", -1),
                           packing=packing, max_length=recipe.data["max_length"])
    if training.get("max_steps", -1) > 0:
        click.echo(f"steps: {steps:,} optimizer steps (training.max_steps)")
        return
    # Packed sequences are never quite full, so with packing the count is a lower bound.
    rows = (f"{report.tokens:,} tokens packed into sequences of up to {recipe.data['max_length']}" if packing
            else f"{report.rows:,} rows")
    click.echo(f"steps: {'about ' if packing else ''}{steps:,} optimizer steps ({rows}, {setup.micro_batch} per "
               f"device x {accumulation} accumulation x {launch.processes} process(es), "
               f"{training.get('num_train_epochs', 1):g} epoch(s))")
