"""The Optuna study behind a sweep: where it is stored, how a sweep resumes, and how several workers share it.

Storage: by default Optuna's journal file in the sweep's folder (nothing to install or start; several processes
on one machine share it through its file lock). `--storage postgresql://...` (or mysql://, sqlite:///) uses
Optuna's database storage instead, which several machines can share; its trials send heartbeats.

Resume: finished trials stay finished. A trial whose process is gone (Ctrl-C, a crash, SIGKILL, a lost machine)
is marked failed and retried once more with the same values in the same folder, so its run resumes from its
last complete checkpoint; it is found dead at once on the same machine (its process id is gone), and through
missed heartbeats from another machine (database storage).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError, OutputDirError

JOURNAL_FILE = "optuna-journal.log"
MARKER_FILE = "lorakit_sweep.json"
STUDY_ATTR = "lorakit"  # study user attribute: what the study searches, to refuse a different sweep on resume
MAX_ATTEMPTS = 3  # an interrupted trial runs at most this often in all
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300  # a database trial without a heartbeat for this long is taken as dead
DRIVERS = {"postgresql": ("postgresql+psycopg", "psycopg", "pip install 'psycopg[binary]'"),
           "mysql": ("mysql+pymysql", "pymysql", "pip install PyMySQL")}


# ---------------------------------------------------------------- storage


def describe_storage(url: str | None, folder: Path) -> str:
    """The storage as it may be printed and written down: a database URL without its password."""
    if not url:
        return str(folder / JOURNAL_FILE)
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str | None, folder: Path) -> Any:
    """Optuna's storage: the journal file in `folder`, a journal file at a path, or a database at a URL."""
    import optuna

    if not url or "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url).expanduser().absolute() if url else folder / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental"
                return optuna.storages.RDBStorage(with_driver(url), heartbeat_interval=HEARTBEAT_SECONDS,
                                                  grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=retry)
        except ModuleNotFoundError as error:
            raise LorakitError(f"--storage {describe_storage(url, folder)}: the database driver {error.name} is not "
                               "installed") from None
        except Exception as error:  # sqlalchemy's: unreachable server, refused login, unknown database
            # Workers started together on an empty database race to create Optuna's tables; the loser retries
            # and finds them made.
            if type(error).__name__ == "IntegrityError" and attempt < 2:
                time.sleep(1 + attempt)
                continue
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LorakitError(f"--storage {describe_storage(url, folder)}: cannot open the study's database: "
                               f"{first}") from None


def with_driver(url: str) -> str:
    """postgresql://... through psycopg 3 (SQLAlchemy would look for psycopg2), mysql://... through PyMySQL,
    unless the URL names its driver (postgresql+psycopg2://)."""
    import importlib.util

    scheme, _, rest = url.partition("://")
    if scheme not in DRIVERS:
        return url
    named, module, install = DRIVERS[scheme]
    if importlib.util.find_spec(module) is None:
        raise LorakitError(f"--storage {scheme}://...: needs the {module} driver: {install}")
    return f"{named}://{rest}"


# ---------------------------------------------------------------- the sweep folder and the study


def check_folder(folder: Path, storage: str, study_name: str) -> None:
    """The sweep's folder holds the sweep's own files only: refuse a folder of something else, or of another
    study, before anything is written."""
    marker = folder / MARKER_FILE
    if marker.is_file():
        try:
            before = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = {}
        if before.get("study_name") != study_name or before.get("storage") != storage:
            raise OutputDirError(
                f"{folder} holds the sweep {before.get('study_name')!r} stored in {before.get('storage')}; run it "
                f"with --study-name {before.get('study_name')} --storage <that storage>, or choose another "
                "--output-dir (nothing was changed)")
        return
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{folder} is a file; choose another --output-dir")
    if folder.exists() and [p for p in folder.iterdir() if p.name != ".DS_Store"]:
        raise OutputDirError(f"{folder} is not empty and holds no lorakit sweep; lorakit never writes over files it "
                             "did not make. Choose another --output-dir (nothing was changed)")


def mark_folder(folder: Path, storage: str, study_name: str) -> None:
    """Name the study and its storage in the folder (once its storage has opened), for the next run to check."""
    marker = folder / MARKER_FILE
    if marker.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps({"study_name": study_name, "storage": storage,
                                         "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def open_study(storage: Any, study_name: str, sweep, recipe_file: Path, described: str) -> Any:
    """Create the study, or join the existing one of the same name when it searches the same space."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=study_name, direction=sweep.direction,
                                sampler=sweep.make_sampler(), pruner=sweep.make_pruner(), load_if_exists=True)
    wanted = {"space": sweep.fingerprint(), "command": sweep.command, "metric": sweep.metric,
              "direction": sweep.direction, "recipe": recipe_file.name}
    before = study.user_attrs.get(STUDY_ATTR)
    if before is None:
        study.set_user_attr(STUDY_ATTR, wanted)
    elif before.get("space") != wanted["space"]:
        raise LorakitError(
            f"study {study_name!r} in {described} was started by {before.get('recipe')} with another command, "
            f"objective or search space ({before.get('command')}, {before.get('direction')} {before.get('metric')}); "
            "a resumed sweep must search the same space. Use another --study-name (or --output-dir) for this one")
    return study


# ---------------------------------------------------------------- the trials that count


def counted_trials(study) -> list:
    """The sweep's trials: all of them except an interrupted trial that was retried (its retry counts instead)
    and a trial that never ran because the study was full."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if t.number not in retried and "not_run" not in t.user_attrs]


def frozen(study, number: int):
    """The stored state of trial `number` (an optuna.trial.FrozenTrial)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def is_full(study, n_trials: int) -> bool:
    """No trial to start: every one of the n_trials is finished or running, and none waits to be retried."""
    from optuna.trial import TrialState

    trials = counted_trials(study)
    return len(trials) >= n_trials and not any(t.state == TrialState.WAITING for t in trials)


def came_too_late(study, trial, n_trials: int) -> bool:
    """True for a trial that another worker's trials left no room for (two workers asked at the same instant)."""
    return sum(1 for t in counted_trials(study) if t.number < trial.number) >= n_trials


# ---------------------------------------------------------------- workers, dead trials, retries


def worker_identity() -> dict[str, Any]:
    """What tells this process apart, even after its process id is reused: host, boot and start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot": boot_id(), "started": start_ticks(os.getpid())}


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def is_alive(worker: dict[str, Any]) -> bool:
    """Whether the process that ran a trial on this machine still runs."""
    if worker.get("boot") != boot_id():
        return False  # the machine restarted since
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process of that id
    started = worker.get("started")
    return started is None or start_ticks(pid) == started


def fail_dead_trials(study) -> list[int]:
    """Mark failed the running trials of this machine whose process is gone, and retry them; return their
    numbers. Only the worker whose change of state went through retries it (Optuna's storages refuse to
    finish a trial twice), so two workers never retry the same trial."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    failed = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") != host or is_alive(worker):
            continue
        try:
            # Optuna's own fail_stale_trials goes through the storage this way; there is no public call for it.
            study._storage.set_trial_user_attr(trial._trial_id, "failure", {
                "reason": "interrupted", "message": f"its process ({worker.get('pid')}) ended during the trial"})
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        failed.append(trial.number)
        retry(study, frozen(study, trial.number))
    return failed


def retry(study, trial) -> None:
    """Queue the interrupted `trial` again: same values, same folder (its run resumes from its last complete
    checkpoint), at most MAX_ATTEMPTS in all. Also Optuna's callback for trials that missed their heartbeats."""
    import optuna

    if any(t.user_attrs.get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)):
        return
    attempt = trial.user_attrs.get("attempt", 1)
    if attempt >= MAX_ATTEMPTS:
        return
    folder = trial.user_attrs.get("folder") or f"trial-{trial.number}"
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs=dict(trial.system_attrs),  # a grid point stays the one it was
        user_attrs={"retry_of": trial.number, "attempt": attempt + 1, "folder": folder}))
