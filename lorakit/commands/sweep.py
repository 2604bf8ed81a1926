"""`lorakit sweep`: a hyperparameter search over a recipe's `sweep:` section with Optuna.

recipe + sweep: section, every sampled recipe checked (lorakit.sweep.recipes) -> the sweep folder and Optuna's
study in its storage (lorakit.sweep.study) -> study.optimize: each trial a full lorakit run through the shared
run lifecycle (lorakit.sweep.trial) -> a table row per trial; sweep_results.csv, best.yaml, plots
(lorakit.sweep.report). The same command resumes a stopped sweep, and started again elsewhere on the same
--storage, adds a worker to it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any

import click

from lorakit.errors import RunInterrupted

STORAGE_HELP = ("Where the study lives: a database URL (postgresql://user@host/db, mysql://..., sqlite:///file.db) "
                "that several machines share, or a journal file path. Default: a journal file in the sweep folder. "
                "Same as LORAKIT_SWEEP_STORAGE (keeps a password out of the shell history).")


@click.command(epilog="OVERRIDES are dotted recipe paths, sweep.* included: sweep.n_trials=40 lora.lora_dropout=0.1.")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="The sweep folder (overrides training.output_dir): the study, one trial-<n>/ run per trial, "
                   "the results.")
@click.option("--storage", envvar="LORAKIT_SWEEP_STORAGE", default=None, help=STORAGE_HELP)
@click.option("--study-name", default=None,
              help="The study's name in the storage (default: the sweep folder's name); every worker of one sweep "
                   "gives the same.")
@click.option("--device", type=click.Choice(["auto", "cuda", "xla", "mps", "xpu", "cpu"]), default=None,
              help="Force a device for every trial (default: the recipe's model.device, auto).")
def command(recipe: str, overrides: tuple[str, ...], output_dir: str | None, storage: str | None,
            study_name: str | None, device: str | None) -> None:
    """Search the hyperparameters in RECIPE's sweep: section, one full lorakit run per trial.

    Stop it at any time (Ctrl-C) and run the same command again to go on; start it on several machines or GPUs
    with the same --storage to share the trials.
    """
    run_sweep(recipe, overrides, output_dir=output_dir, storage=storage, study_name=study_name, device=device)


def run_sweep(recipe_path: str, overrides: tuple[str, ...] = (), *, output_dir: str | None = None,
              storage: str | None = None, study_name: str | None = None, device: str | None = None) -> Any:
    """Run (or go on with) the sweep; return the Optuna study."""
    import optuna

    from lorakit.sweep import report
    from lorakit.sweep import study as studies
    from lorakit.sweep.recipes import load_sweep_recipe
    from lorakit.sweep.trial import TRIAL_FAILURES, StudyFull, make_objective

    recipe = load_sweep_recipe(recipe_path, overrides, output_dir)  # every problem of the space, before trial 1
    sweep, folder = recipe.sweep, recipe.folder
    name = study_name or folder.name
    described = studies.describe_storage(storage, folder)
    studies.check_folder(folder, described, name)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is told below, failures with their reason
    study = studies.open_study(studies.open_storage(storage, folder), name, sweep, recipe.file, described)
    studies.mark_folder(folder, described, name)
    click.secho(f"lorakit sweep: study {name!r} in {described}: {sweep.n_trials} trials of lorakit {sweep.command}, "
                f"{sweep.direction} {sweep.metric}; sampler {sweep.sampler}, pruner {sweep.pruner}", bold=True)
    say_retried(studies.fail_dead_trials(study))
    printed: list[int] = []

    def after_trial(study, trial) -> None:
        if "not_run" not in trial.user_attrs:
            if not printed:
                click.echo(report.header(recipe))
            entry = next(e for e in report.rows(study, recipe) if e["trial"] == trial.number)
            click.secho(report.table_row(entry, recipe), bold=True)
            printed.append(trial.number)
            report.write_results(study, recipe, plots=False)
        say_retried(studies.fail_dead_trials(study))
        if studies.is_full(study, sweep.n_trials):
            study.stop()
        free_device_memory()

    objective = make_objective(recipe, device=device,
                               on_start=lambda trial, values: report.announce(study, trial, values, recipe))
    with sigterm_as_interrupt():
        try:
            if not studies.is_full(study, sweep.n_trials):
                study.optimize(objective, catch=(*TRIAL_FAILURES, StudyFull), callbacks=[after_trial],
                               gc_after_trial=True)
        except (KeyboardInterrupt, RunInterrupted) as error:
            report.write_results(study, recipe, plots=False)
            why = str(error).split(";")[0] if str(error) else "interrupted"
            raise RunInterrupted(f"sweep stopped ({why}); every finished trial is kept in {described}. Run the same "
                                 "command again to go on: the interrupted trial runs again with the same values, "
                                 "resuming from its last complete checkpoint") from None
        except BaseException:
            report.write_results(study, recipe, plots=False)
            raise
    click.secho("lorakit sweep: results", bold=True)
    report.print_table(study, recipe)
    written = report.write_results(study, recipe, plots=True)
    click.echo("lorakit sweep: wrote " + ", ".join(str(path) for path in written))
    running = [t.number for t in studies.counted_trials(study) if not t.state.is_finished()]
    if running:
        click.echo(f"lorakit sweep: trial(s) {', '.join(map(str, running))} still run in other workers; the same "
                   "command, run after they finish, brings these results up to date")
    return study


def say_retried(numbers: list[int]) -> None:
    for number in numbers:
        click.echo(f"lorakit sweep: trial {number} was interrupted (its process is gone); it runs again with the same "
                   "values, resuming from its last complete checkpoint")


def free_device_memory() -> None:
    """Each trial loads its own model; what the last one cached on the GPU goes back before the next."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop) between trials or while a trial loads ends the sweep like Ctrl-C does; during
    training the run's own handler takes over and saves a checkpoint first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
