"""`lorakit validate`: everything `lorakit sft` does before its first training step, without loading weights.

recipe (checked exactly as sft checks it) -> model config and tokenizer -> data -> the trained tokens of real rows
-> the chat template saved with the adapter -> peak memory and steps. Each check runs even when an earlier one
found a problem, where it can, so one run lists everything to fix. Exit 0: the run can start; exit 1: it cannot,
every problem listed; exit 2: the recipe itself is invalid (the same message and code as `lorakit sft`).
"""

from __future__ import annotations

from pathlib import Path

import click

from lorakit.checks.findings import Findings, indent
from lorakit.checks.inputs import (check_output_dir, load_model_config, load_training_tokenizer, prepare_training_data,
                                   show_examples)
from lorakit.checks.labels import check_saved_template, check_trained_tokens
from lorakit.checks.memory import check_memory, report_steps
from lorakit.errors import LorakitError, ValidationFailed
from lorakit.models.start_point import recipe_command
from lorakit.recipe.load import load_recipe

OVERRIDES_HELP = "OVERRIDES are dotted recipe paths, e.g. training.learning_rate=1e-4 lora.r=8 data.max_length=512."


@click.command(epilog=OVERRIDES_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--samples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Training examples to show with their trained tokens marked.")
@click.option("--gpu-memory", metavar="SIZE",
              help="Memory of the GPU the run is for, e.g. 24GiB or 80GB: a problem when the estimate does not fit. "
                   "Default: this machine's GPU, if it has one.")
@click.option("--device", type=click.Choice(["auto", "cuda", "xla", "mps", "xpu", "cpu"]), default=None,
              help="Estimate memory for this device (default: the recipe's model.device; auto means a GPU).")
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="Processes the run will use, as for `lorakit sft`; same as launch.num_processes.")
@click.option("--accelerate-config", type=click.Path(dir_okay=False), default=None,
              help="accelerate config the run will use, as for `lorakit sft`; same as launch.accelerate_config.")
@click.option("--command", "command_name", type=click.Choice(["sft", "dpo", "classify"]), default=None,
              help="The training command the recipe is for (default: from its first line, `# lorakit dpo ...`; "
                   "else sft).")
def command(recipe: str, overrides: tuple[str, ...], samples: int, gpu_memory: str | None, device: str | None,
            num_processes: int | None, accelerate_config: str | None, command_name: str | None) -> None:
    """Check RECIPE, its data, the tokens it trains and the memory it needs, before any training.

    Loads the model's config and tokenizer, never its weights.
    """
    if num_processes:
        overrides = (*overrides, f"launch.num_processes={num_processes}")
    if accelerate_config:
        overrides = (*overrides, f"launch.accelerate_config={Path(accelerate_config).absolute()}")
    limit = parse_gpu_memory(gpu_memory)
    command_name = command_name or recipe_command(Path(recipe))
    findings = validate(recipe, overrides, samples=samples, gpu_memory=limit, device=device, command=command_name)
    if findings.problems:
        count = len(findings.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''}: the run cannot start as it stands:"]
        lines += [f"  - {indent(p, 4)}" for p in findings.problems]
        raise ValidationFailed("\n".join(lines))
    note = f" ({len(findings.warnings)} warning{'s' if len(findings.warnings) != 1 else ''} above)" \
        if findings.warnings else ""
    from lorakit.sweep.recipes import has_sweep_section

    runner = "sweep" if has_sweep_section(recipe) else command_name
    click.secho(f"lorakit validate: the run can start{note}: lorakit {runner} {recipe}", fg="green", bold=True)


def parse_gpu_memory(text: str | None) -> int | None:
    from lorakit.training.memory import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as error:
        raise LorakitError(f"--gpu-memory: {error}") from None


def validate(recipe_path: str, overrides: tuple[str, ...] = (), *, samples: int = 2, gpu_memory: int | None = None,
             device: str | None = None, command: str = "sft") -> Findings:
    """Run every check, print the report, and return what was found."""
    from lorakit.sweep.recipes import has_sweep_section, recipe_for_validate
    from lorakit.training.lifecycle import refuse_unsafe_settings

    sweep = has_sweep_section(recipe_path)
    if sweep:  # lorakit sweep's checks of its section and of every recipe its space can produce (exit 2 as sweep)
        recipe, command, sweep_note = recipe_for_validate(recipe_path, overrides)
    else:
        recipe = load_recipe(recipe_path, overrides, command=command)  # RecipeError: exit 2, the command's message
    refuse_unsafe_settings(recipe)
    findings = Findings()
    click.secho(f"lorakit validate {recipe_path}", bold=True)
    findings.ok(f"recipe: valid (the checks lorakit {command} makes)")
    for warning in recipe.warnings:
        findings.warning(f"recipe: {warning}")
    if sweep:
        findings.ok(sweep_note)  # each trial has its own folder in the sweep's: no output folder to check here
    else:
        check_output_dir(recipe.output_dir, findings)
    if command == "classify":  # the tokenizer, the head for this model, the labelled rows, the memory
        from lorakit.commands.classify import check_classify_recipe

        check_classify_recipe(recipe, findings, samples=samples, device=device, gpu_memory=gpu_memory)
        return findings
    if command == "dpo":  # the start point, pairs and their scored tokens, a preference step's memory
        from lorakit.checks.preferences import check_dpo_run

        check_dpo_run(recipe, findings, samples=samples, gpu_memory=gpu_memory, device=device)
        return findings

    tokenizer = load_training_tokenizer(recipe, findings)
    config = load_model_config(recipe, findings, report_failure=tokenizer is not None)
    data = prepare_training_data(recipe, tokenizer, findings)
    if data is not None:
        show_examples(tokenizer, data.train, samples, recipe)
        check_trained_tokens(recipe, tokenizer, findings)
    if tokenizer is not None:
        check_saved_template(tokenizer, recipe, findings)
    check_memory(recipe, config, data, device, gpu_memory, findings)
    report_steps(recipe, data)
    return findings
