"""A sweep stopped and resumed, and shared: SIGKILL during a trial, then the same command finishes the study
without rerunning a finished trial; two processes on one storage (the embedded journal file, and a real
PostgreSQL server this test starts) run disjoint trials of one study."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from sweep_recipes import write_sweep_recipe

from lorakit.cli import main
from lorakit.sweep import study as studies
from lorakit.training import run_dir

SWEEP = """\
n_trials: {n}
sampler: {{name: tpe, n_startup_trials: 2}}
pruner: none
parameters:
  training.learning_rate: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
  lora.r: {{type: categorical, choices: [2, 4, 8]}}
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def sweep_process(recipe: Path, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit", "sweep", str(recipe), *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the sweep ended (exit {process.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def announced(log: Path) -> list[int]:
    """The trial numbers a sweep process said it started."""
    return [int(n) for n in re.findall(r"lorakit sweep: trial \d+ of \d+ \(#(\d+)", log.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_sweep_stopped_during_a_trial_resumes_it_from_its_checkpoint_and_reruns_nothing(tiny_llama, tmp_path, stop):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, SWEEP.format(n=3), steps=8, eval_steps=4,
                                training="save_steps: 2\n")
    recipe.write_text(recipe.read_text().replace('save_strategy: "no"', "save_strategy: steps"))
    folder = tmp_path / "sweep"
    log = tmp_path / "first.log"
    process = sweep_process(recipe, log)
    try:
        wait_for(folder / "trial-1" / "checkpoint-2" / run_dir.COMPLETE_MARKER, process)
        os.killpg(process.pid, stop)  # SIGKILL: nothing of lorakit runs after it; SIGINT: Ctrl-C in a terminal
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if stop == signal.SIGINT:
        assert code == 75, log.read_text()[-3000:]
        assert "sweep stopped (stopped by SIGINT at step" in log.read_text()
        assert run_dir.read_record(folder / "trial-1")["status"] == run_dir.INTERRUPTED
    else:
        assert run_dir.read_record(folder / "trial-1")["status"] == run_dir.RUNNING
    first = (folder / "trial-0" / run_dir.RECORD_FILE).read_text()
    kept = run_dir.latest_complete_checkpoint(folder / "trial-1").name  # checkpoint-2, or a later one

    result = CliRunner().invoke(main, ["sweep", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    if stop == signal.SIGKILL:  # a Ctrl-C'd trial is marked by its own process, before it exits
        assert "lorakit sweep: trial 1 was interrupted (its process is gone)" in result.output
    assert f"resuming from {kept}" in result.output
    study = optuna.load_study(study_name="sweep", storage=studies.open_storage(None, folder))
    counted = studies.counted_trials(study)
    assert len(counted) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    retry = next(t for t in counted if t.user_attrs.get("retry_of") == 1)
    assert retry.params == study.trials[1].params and retry.user_attrs["folder"] == "trial-1"
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    assert (folder / "trial-0" / run_dir.RECORD_FILE).read_text() == first  # finished: not run again
    resumed = run_dir.read_record(folder / "trial-1")
    assert resumed["status"] == run_dir.COMPLETED and resumed["resumed_from"] == kept
    assert sorted(p.name for p in folder.glob("trial-*")) == sorted(t.user_attrs["folder"] for t in counted)
    assert f"interrupted, retried as {retry.number}" in (folder / "sweep_results.csv").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))  # Debian's postgresql package
    return Path(versions[-1]).parent if versions else None


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder, run as an unprivileged user (PostgreSQL refuses root)."""
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')")
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    demote, env = None, dict(os.environ)
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres account to run the server as")

        def demote():
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)

        env["HOME"] = account.pw_dir
    data = Path(tempfile.mkdtemp(prefix="lorakit-pg-"))
    if demote is not None:
        os.chown(data, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
    port = free_port()

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(binaries / command[0]), *command[1:]], capture_output=True, text=True, env=env,
                              check=False, preexec_fn=demote, cwd=data, timeout=120)

    try:
        made = run("initdb", "-D", str(data / "db"), "-U", "lorakit", "-A", "trust", "--no-sync")
        if made.returncode != 0:
            pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
        started = run("pg_ctl", "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "start", "-o",
                      f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off")
        if started.returncode != 0:
            log = (data / "server.log").read_text() if (data / "server.log").exists() else started.stderr
            pytest.skip(f"the PostgreSQL server did not start: {log.strip()[-300:]}")
        yield f"postgresql://lorakit@127.0.0.1:{port}/postgres"
    finally:
        run("pg_ctl", "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_two_workers_on_one_storage_run_disjoint_trials_of_one_study(tiny_llama, tmp_path, storage, request):
    recipe = write_sweep_recipe(tmp_path, tiny_llama, SWEEP.format(n=4))
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else None
    # On PostgreSQL as on two machines: each worker its own folder, one study in the database.
    args = ("--storage", url, "--study-name", "shared") if url else ()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    outputs = [tmp_path / "sweep-a", tmp_path / "sweep-b"] if args else [tmp_path / "sweep"] * 2
    workers = [sweep_process(recipe, log, "--output-dir", str(out), *args) for log, out in zip(logs, outputs)]
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]

    study = optuna.load_study(study_name="shared" if url else "sweep", storage=studies.open_storage(url, outputs[0]))
    counted = studies.counted_trials(study)
    assert len(counted) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    ran = [announced(log) for log in logs]
    assert ran[0] and ran[1], f"both workers took trials: {ran}"
    assert not set(ran[0]) & set(ran[1]) and sorted(ran[0] + ran[1]) == sorted(t.number for t in counted)
    for numbers, worker, out in zip(ran, workers, outputs):
        for trial in (t for t in counted if t.number in numbers):
            assert trial.user_attrs["worker"]["pid"] == worker.pid
            assert run_dir.read_record(out / f"trial-{trial.number}")["status"] == run_dir.COMPLETED
