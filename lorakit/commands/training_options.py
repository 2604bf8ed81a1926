"""The command-line options every training command shares (sft, dpo, classify), and their relaunch through
accelerate when the run spans several processes or machines."""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable

import click

if TYPE_CHECKING:
    from lorakit.recipe.sections import Recipe

OVERRIDES_HELP = "OVERRIDES are dotted recipe paths, e.g. training.learning_rate=1e-4 lora.r=8 data.max_length=512."
RUN_OPTIONS = ("output_dir", "overwrite", "no_resume", "resume_changed", "device")
LAUNCH_OPTIONS = ("num_processes", "accelerate_config", "num_machines", "machine_rank", "main_process_ip",
                  "main_process_port")


def training_command(function: Callable) -> click.Command:
    """A click command taking RECIPE, OVERRIDES and the shared run and launch options."""
    options = [
        click.argument("recipe", type=click.Path(dir_okay=False)),
        click.argument("overrides", nargs=-1),
        click.option("--output-dir", type=click.Path(file_okay=False),
                     help="Where to write the run (overrides training.output_dir)."),
        click.option("--overwrite", is_flag=True, help="Replace a finished or different run already in the output folder."),
        click.option("--no-resume", is_flag=True,
                     help="Start over instead of resuming an interrupted run (needs --overwrite)."),
        click.option("--resume-changed", is_flag=True,
                     help="Resume even though the recipe or data changed since the checkpoint."),
        click.option("--device", type=click.Choice(["auto", "cuda", "xla", "mps", "xpu", "cpu"]), default=None,
                     help="Force a device (default: the recipe's model.device, auto)."),
        click.option("--num-processes", type=click.IntRange(min=1), default=None,
                     help="Processes to launch through accelerate (one per GPU); same as launch.num_processes."),
        click.option("--accelerate-config", type=click.Path(dir_okay=False), default=None,
                     help="accelerate config (DDP, FSDP, DeepSpeed: recipes/accelerate/); same as "
                          "launch.accelerate_config."),
        click.option("--num-machines", type=click.IntRange(min=1), default=None, help="Nodes, for a multi-node launch."),
        click.option("--machine-rank", type=click.IntRange(min=0), default=None, help="This node's rank (multi-node)."),
        click.option("--main-process-ip", default=None, help="Address of the rank-0 node (multi-node)."),
        click.option("--main-process-port", type=int, default=None, help="Port of the rank-0 node (multi-node)."),
    ]
    for option in reversed(options):
        function = option(function)
    return click.command(epilog=OVERRIDES_HELP)(function)


def relaunch_if_distributed(command_name: str, recipe_path: str, overrides: tuple[str, ...], recipe: Recipe,
                            options: dict[str, Any]) -> None:
    """Re-run this command through `accelerate launch` when it asks for several processes or machines (exits);
    return when it runs in this process. `recipe` is RECIPE with OVERRIDES and --output-dir, loaded."""
    from lorakit.training import launch

    if launch.already_launched():
        return
    settings = recipe.launch or {}
    num_processes = options.get("num_processes") or settings.get("num_processes")
    accelerate_config = options.get("accelerate_config") or settings.get("accelerate_config")
    if not ((num_processes or 1) > 1 or accelerate_config or (options.get("num_machines") or 1) > 1):
        return
    args = [recipe_path, *overrides]
    if options.get("output_dir"):
        args += ["--output-dir", options["output_dir"]]
    for flag in ("overwrite", "no_resume", "resume_changed"):
        if options.get(flag):
            args.append("--" + flag.replace("_", "-"))
    if options.get("device"):
        args += ["--device", options["device"]]
    line = launch.launch_command(args, num_processes, accelerate_config, options.get("num_machines"),
                                 options.get("machine_rank"), options.get("main_process_ip"),
                                 options.get("main_process_port"), command_name=command_name)
    click.echo("lorakit: " + shlex.join(line))
    threads = launch.threads_per_process(num_processes, options.get("num_machines"), accelerate_config)
    sys.exit(launch.relaunch(line, threads, recipe.output_dir))


def run_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that go to the run itself (not to the launcher)."""
    return {key: options[key] for key in RUN_OPTIONS}
