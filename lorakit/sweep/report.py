"""What a sweep shows and leaves behind: a line as each trial starts (n of N, the best so far), a table row as
each finishes and the whole table at the end, sweep_results.csv, best.yaml (the best trial's resolved recipe,
ready for `lorakit sft best.yaml`), and Optuna's optimisation history and parameter importances as PNG."""

from __future__ import annotations

import csv
import datetime
import io
import os
import warnings
from pathlib import Path
from typing import Any

import click
import yaml

from lorakit.recipe.sections import redact
from lorakit.sweep import study as studies
from lorakit.sweep.recipes import SweepRecipe

RESULTS_FILE = "sweep_results.csv"
BEST_FILE = "best.yaml"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
COLUMN = 10  # narrowest column of the table


# ---------------------------------------------------------------- one row per trial


def shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return "-" if value is None else str(value)


def state_of(trial, trials: list) -> str:
    """complete, pruned at step N, failed: why, interrupted (retried as N), running, waiting."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.PRUNED:
        steps = sorted(trial.intermediate_values)
        return f"pruned at step {steps[-1]}" if steps else "pruned"
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.state == TrialState.WAITING:
        return f"waiting (retry of {trial.user_attrs['retry_of']})" if "retry_of" in trial.user_attrs else "waiting"
    failure = trial.user_attrs.get("failure") or {"reason": "interrupted"}  # no word from it: its worker died
    if failure["reason"] not in ("interrupted", "stopped by an error"):
        return f"failed: {failure['reason']}"
    retry = next((t.number for t in trials if t.user_attrs.get("retry_of") == trial.number), None)
    if retry is not None:
        return f"{failure['reason']}, retried as {retry}"
    return f"{failure['reason']}, not retried ({trial.user_attrs.get('attempt', 1)} attempts)"


def duration(trial) -> float | None:
    if trial.datetime_start is None:
        return None
    end = trial.datetime_complete or datetime.datetime.now()
    return round((end - trial.datetime_start).total_seconds(), 1)


def row(trial, recipe: SweepRecipe, trials: list) -> dict[str, Any]:
    from optuna.trial import TrialState

    sweep = recipe.sweep
    values = trial.user_attrs.get("values") or trial.params
    failure = trial.user_attrs.get("failure") or {}
    out: dict[str, Any] = {"trial": trial.number}
    out.update({p.key: values.get(p.key) for p in sweep.parameters + sweep.expressions})
    out[sweep.metric] = trial.value if trial.state == TrialState.COMPLETE else None
    out["state"] = state_of(trial, trials)
    out["duration_s"] = duration(trial)
    out["folder"] = trial.user_attrs.get("folder") or f"trial-{trial.number}"
    out["note"] = failure.get("message") or ""
    return out


def rows(study, recipe: SweepRecipe) -> list[dict[str, Any]]:
    trials = study.get_trials(deepcopy=False)
    return [row(t, recipe, trials) for t in trials if "not_run" not in t.user_attrs]


# ---------------------------------------------------------------- what is printed


def columns(recipe: SweepRecipe) -> list[str]:
    sweep = recipe.sweep
    return ["trial", *(p.key for p in sweep.parameters + sweep.expressions), sweep.metric, "state", "duration_s"]


def table_line(values: list[str], names: list[str]) -> str:
    """Numbers right-aligned, the state left-aligned, each column as wide as its name (at least COLUMN)."""
    width = {name: max(COLUMN, len(name)) for name in names}
    return "  ".join(value.ljust(width[name] + 12) if name == "state" else value.rjust(width[name])
                     for value, name in zip(values, names)).rstrip()


def header(recipe: SweepRecipe) -> str:
    names = columns(recipe)
    return table_line(names, names)


def table_row(entry: dict[str, Any], recipe: SweepRecipe, best: int | None = None) -> str:
    names = columns(recipe)
    values = [shown(entry[name]) for name in names]
    values[0] = ("*" if entry["trial"] == best else "") + values[0]
    return table_line(values, names)


def best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def best_so_far(study, metric: str) -> str:
    best = best_trial(study)
    return f"best so far: {metric} {best.value:.5g} (trial {best.number})" if best else "no trial completed yet"


def announce(study, trial, values: dict[str, Any], recipe: SweepRecipe) -> None:
    """The line that opens a trial: which of how many, its values, the best so far."""
    sweep = recipe.sweep
    counted = studies.counted_trials(study)
    position = sum(1 for t in counted if t.number <= trial.number)
    retry = f", retry of trial {trial.user_attrs['retry_of']}" if "retry_of" in trial.user_attrs else ""
    settings = ", ".join(f"{key}={shown(value)}" for key, value in values.items())
    click.secho(f"lorakit sweep: trial {position} of {sweep.n_trials} (#{trial.number}{retry}): {settings}; "
                f"{best_so_far(study, sweep.metric)}", bold=True)


def print_table(study, recipe: SweepRecipe) -> None:
    best = best_trial(study)
    click.echo(header(recipe))
    for entry in rows(study, recipe):
        click.echo(table_row(entry, recipe, best.number if best else None))
    if best is not None:
        click.echo(f"* best: trial {best.number}, {recipe.sweep.metric} {best.value:.5g}")


# ---------------------------------------------------------------- what is written


def write_results(study, recipe: SweepRecipe, *, plots: bool) -> list[Path]:
    """sweep_results.csv and best.yaml (after every trial), the plots (at the end); return what was written."""
    folder = recipe.folder
    written = [write_csv(folder / RESULTS_FILE, rows(study, recipe), columns(recipe) + ["folder", "note"])]
    best = best_trial(study)
    if best is not None:
        written.append(write_best(folder / BEST_FILE, recipe, best, study))
    if plots:
        written += write_plots(study, recipe)
    return written


def write_csv(path: Path, entries: list[dict[str, Any]], names: list[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow({k: ("" if v is None else v) for k, v in entry.items()})
    studies.write_atomically(path, buffer.getvalue())
    return path


def write_best(path: Path, recipe: SweepRecipe, best, study) -> Path:
    """The best trial's recipe, resolved and checked again on this machine, training into <folder>/best."""
    sweep = recipe.sweep
    values = best.user_attrs.get("values") or recipe.values_for(best.params)
    resolved = recipe.trial_recipe(values, "best")
    finished = sum(1 for t in studies.counted_trials(study) if t.state.is_finished())
    text = (f"# lorakit {sweep.command} {path.name}\n"
            f"# The best of {finished} finished trials of sweep {study.study_name!r}: trial {best.number}, "
            f"{sweep.metric} {best.value:.6g} ({sweep.direction}).\n"
            f"# Its adapter is in {recipe.folder / (best.user_attrs.get('folder') or f'trial-{best.number}')}; "
            f"this recipe trains it again into {resolved.output_dir}.\n"
            + yaml.safe_dump(redact(resolved.to_dict()), sort_keys=False, allow_unicode=True))
    studies.write_atomically(path, text)
    return path


def write_plots(study, recipe: SweepRecipe) -> list[Path]:
    """Optuna's own matplotlib plots; a plot Optuna cannot draw yet (too few trials) is skipped with a word."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    wanted = [(HISTORY_PLOT, plots.plot_optimization_history, 1),
              (IMPORTANCE_PLOT, plots.plot_param_importances, 2)]
    written = []
    for name, plot, needed in wanted:
        if len(complete) < needed or (plot is plots.plot_param_importances and not study.best_trial.params):
            click.echo(f"lorakit sweep: {name} needs {needed} completed trials with searched values; not drawn yet")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the plots are "experimental"
            try:
                axes = plot(study, target_name=recipe.sweep.metric)
            except (ValueError, RuntimeError) as error:  # e.g. importances of values that never varied
                click.echo(f"lorakit sweep: {name} not drawn: {error}")
                continue
        figure = axes.figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        path = recipe.folder / name
        # Each worker of a shared study writes the plots as it finishes: its own temporary file, so that two
        # finishing together each replace the plot whole instead of moving the other's half-written file away.
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp.png")
        figure.savefig(tmp, dpi=100)
        plt.close(figure)
        tmp.replace(path)
        written.append(path)
    return written
