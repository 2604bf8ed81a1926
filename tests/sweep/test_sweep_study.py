"""The study behind a sweep, without training: which trials count, a dead worker's trial retried exactly once,
the sweep folder guarded, and storage URLs shown without their password."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest

from lorakit.errors import LorakitError, OutputDirError
from lorakit.sweep import study as studies


@pytest.fixture
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = studies.open_storage(None, tmp_path)
    return optuna.create_study(storage=storage, study_name="s", direction="minimize")


def dead_worker() -> dict:
    """The identity of a process of this machine that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return {**studies.worker_identity(), "pid": process.pid, "started": None}


def start(study, lr: float, worker: dict) -> optuna.trial.Trial:
    trial = study.ask()
    trial.suggest_float("training.learning_rate", 1e-5, 1e-2, log=True)
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("folder", f"trial-{trial.number}")
    return trial


def test_a_dead_workers_trial_is_retried_once_with_its_values_and_folder(study):
    done = start(study, 1e-3, studies.worker_identity())
    study.tell(done, 1.0)
    alive = start(study, 1e-3, studies.worker_identity())  # this process: still running
    dead = start(study, 1e-3, dead_worker())

    assert studies.fail_dead_trials(study) == [dead.number]
    assert studies.fail_dead_trials(study) == []  # a second look (another worker's) retries nothing more
    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    assert states[alive.number] == optuna.trial.TrialState.RUNNING
    assert states[dead.number] == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == optuna.trial.TrialState.WAITING
    assert retry.params == study.get_trials()[dead.number].params
    assert retry.user_attrs["folder"] == f"trial-{dead.number}" and retry.user_attrs["attempt"] == 2
    # The retry counts in place of the interrupted trial; a waiting retry keeps the study open.
    assert [t.number for t in studies.counted_trials(study)] == [done.number, alive.number, retry.number]
    assert not studies.is_full(study, 3)
    popped = study.ask()  # Optuna hands out the waiting retry first, with the same values
    assert popped.number == retry.number
    assert popped.suggest_float("training.learning_rate", 1e-5, 1e-2, log=True) == retry.params["training.learning_rate"]
    study.tell(popped, 0.5)
    study.tell(alive, 0.7)
    assert studies.is_full(study, 3) and not studies.is_full(study, 4)


def test_a_trial_interrupted_again_and_again_stops_being_retried(study):
    trial = start(study, 1e-3, dead_worker())
    for attempt in range(2, studies.MAX_ATTEMPTS + 1):
        studies.fail_dead_trials(study)
        trial = study.ask()
        assert trial.user_attrs["attempt"] == attempt
        trial.set_user_attr("worker", dead_worker())
    studies.fail_dead_trials(study)
    assert not [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert len(studies.counted_trials(study)) == 1  # only the last attempt counts: as failed


def test_a_trial_asked_for_when_the_study_is_full_is_told_so(study):
    first, second = start(study, 1e-3, {}), start(study, 1e-3, {})
    assert not studies.came_too_late(study, first, 2) and not studies.came_too_late(study, second, 2)
    third = start(study, 1e-3, {})
    assert studies.came_too_late(study, third, 2)


def test_the_sweep_folder_holds_one_study_and_nothing_else(tmp_path):
    folder = tmp_path / "sweep"
    studies.check_folder(folder, "journal", "a")
    studies.mark_folder(folder, "journal", "a")
    studies.check_folder(folder, "journal", "a")  # the same sweep again: resumed
    with pytest.raises(OutputDirError, match="holds the sweep 'a' stored in journal"):
        studies.check_folder(folder, "postgresql://u:***@h/db", "a")
    with pytest.raises(OutputDirError, match="holds the sweep 'a'"):
        studies.check_folder(folder, "journal", "b")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds no lorakit sweep"):
        studies.check_folder(other, "journal", "a")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_storage_urls_are_shown_without_password_and_get_their_driver(tmp_path):
    assert studies.describe_storage("postgresql://ann:s3cret@db:5432/sweeps", tmp_path) == \
        "postgresql://ann:***@db:5432/sweeps"
    assert studies.describe_storage(None, tmp_path) == str(tmp_path / studies.JOURNAL_FILE)
    assert studies.with_driver("postgresql://ann@db/sweeps") == "postgresql+psycopg://ann@db/sweeps"
    assert studies.with_driver("postgresql+psycopg2://ann@db/sweeps") == "postgresql+psycopg2://ann@db/sweeps"
    with pytest.raises(LorakitError, match="cannot open the study's database") as error:
        studies.open_storage("sqlite:////nonexistent-folder/x.db", tmp_path)
    assert "Traceback" not in str(error.value)
