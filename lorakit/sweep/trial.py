"""One trial: Optuna's values set in the recipe, a full lorakit run in <sweep folder>/trial-<n>/ through the
shared run lifecycle (guards, record, atomic save), its evaluations reported to Optuna as they come, and the
objective read from the finished run's record.

How a trial ends:
- completed: its objective is the run's final value of sweep.objective.metric;
- pruned: an evaluation was worse than the pruner allows (Optuna's TrialPruned stops training at once);
- failed: it diverged, stalled, ran out of memory, or its sampled recipe was refused; the sweep goes on;
- interrupted (Ctrl-C, SIGTERM, an error outside the run's own control): failed, retried with the same values in
  the same folder when the sweep runs again, and this sweep stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from lorakit.errors import (
    LorakitError,
    OutOfMemory,
    RecipeError,
    RunInterrupted,
    TrainingDiverged,
    TrainingStalled,
)
from lorakit.sweep import study as studies
from lorakit.sweep.recipes import SweepRecipe
from lorakit.training import run_dir
from lorakit.training.guards import Callback

# Failures that belong to the trial's values: recorded, and the sweep goes on to the next trial.
TRIAL_FAILURES = (TrainingDiverged, TrainingStalled, OutOfMemory, RecipeError)


class StudyFull(Exception):
    """This trial was asked for when other workers had already started the study's last trials."""


class ReportToOptuna(Callback):
    """Each evaluation's value of the objective metric goes to Optuna; a trial the pruner gives up on stops."""

    def __init__(self, trial, metric: str):
        self.trial = trial
        self.metric = metric
        self.reported: set[int] = set()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        value = (metrics or {}).get(self.metric)
        step = state.global_step
        if not isinstance(value, (int, float)) or step in self.reported:
            return  # the final evaluation repeats the last step's
        self.trial.report(float(value), step)
        self.reported.add(step)
        if step < state.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} of {state.max_steps}: {self.metric} {value:.4g} is "
                                     "worse than the pruner allows against the trials before it")


def make_objective(recipe: SweepRecipe, *, device: str | None, on_start: Callable[[Any, dict], None]) -> Callable:
    """Optuna's objective: a plain function of a trial, returning the trial's objective value."""
    sweep = recipe.sweep
    build = recipe.build_function()

    def objective(trial) -> float:
        trial.set_user_attr("worker", studies.worker_identity())
        if studies.came_too_late(trial.study, trial, sweep.n_trials):
            trial.set_user_attr("not_run", f"the study already had its {sweep.n_trials} trials")
            raise StudyFull()
        folder = trial.user_attrs.get("folder") or f"trial-{trial.number}"
        trial.set_user_attr("folder", folder)
        try:
            values = recipe.values_for({p.key: p.suggest(trial) for p in sweep.parameters})
            trial.set_user_attr("values", values)
            on_start(trial, values)
            trial_recipe = recipe.trial_recipe(values, folder)
            out = trial_recipe.output_dir
            record = finished_record(trial_recipe) or run_dir.read_record(run_trial(trial_recipe, build, trial,
                                                                                    sweep.metric, device))
        except BaseException as error:
            end_trial(trial, recipe.folder / folder, error)
            raise
        value = (record.get("metrics") or {}).get(sweep.metric)
        if not isinstance(value, (int, float)):
            reported = ", ".join(sorted(record.get("metrics") or {})) or "nothing"
            trial.set_user_attr("failure", {"reason": "no objective", "message": f"no {sweep.metric} reported"})
            raise LorakitError(f"sweep.objective.metric: trial {trial.number}'s run reported no {sweep.metric}; it "
                               f"reported {reported} (in {out})")
        return float(value)

    return objective


def run_trial(trial_recipe, build: Callable, trial, metric: str, device: str | None) -> Path:
    from lorakit.training import lifecycle

    return lifecycle.run(trial_recipe, build, device=device, callbacks=(ReportToOptuna(trial, metric),))


def finished_record(trial_recipe) -> dict | None:
    """The record of a run of exactly this recipe that already finished in the trial's folder (the sweep stopped
    after the run ended but before Optuna heard of it): its result is used, not trained again."""
    record = run_dir.read_record(trial_recipe.output_dir)
    if not record or record.get("status") != run_dir.COMPLETED:
        return None
    from lorakit.data import cache

    fingerprint = run_dir.Fingerprint(trial_recipe.fingerprint(), cache.source_fingerprints(trial_recipe.data))
    if record.get("fingerprint") != fingerprint.value:
        return None
    click.echo(f"lorakit sweep: {trial_recipe.output_dir.name} already holds this trial's finished run: using it")
    return record


def end_trial(trial, out: Path, error: BaseException) -> None:
    """Record why a trial did not complete; queue an interrupted one again; free the disk a dead trial holds."""
    import optuna

    from lorakit.training.lifecycle import describe_failure

    if isinstance(error, (StudyFull, optuna.TrialPruned)):
        if isinstance(error, optuna.TrialPruned):
            remove_checkpoints(out)
        return
    if isinstance(error, TRIAL_FAILURES):
        failure = describe_failure(error)
        if isinstance(error, RecipeError):
            failure = {"reason": "invalid recipe", "message": str(error).splitlines()[-1].strip()}
        trial.set_user_attr("failure", failure)
        remove_checkpoints(out)
        return
    reason = "interrupted" if isinstance(error, (RunInterrupted, KeyboardInterrupt)) else "stopped by an error"
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    trial.set_user_attr("failure", {"reason": reason, "message": message[:500]})
    # Queued now, while this process still owns the trial: the next run (or another worker) resumes it.
    studies.retry(trial.study, studies.frozen(trial.study, trial.number))


def remove_checkpoints(out: Path) -> None:
    """A pruned or failed trial is never resumed: its checkpoints only take disk (its record stays)."""
    if out.is_dir():
        run_dir.remove_checkpoints(out)
