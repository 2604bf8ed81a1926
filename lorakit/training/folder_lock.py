"""One writer per output folder: an exclusive lock held for as long as a run, a merge or an export writes it.

Two runs into one folder at once would leave a mix of both (one's adapter config, the other's weights and
recipe). The lock is an `fcntl.flock` on a small file beside the folder, `.NAME.lock` in its parent (beside, not
inside: a merge renames its finished folder into place, and the folder must not exist before a run). It holds the
holder's pid, host, command and start time, so a second writer is refused at once with who holds it.

The kernel releases a flock when its process dies, however it dies (SIGKILL, OOM killer, power loss), so a lock
file left by a killed process is stale by construction: the next writer takes it over and says whose it was.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from lorakit.errors import OutputDirError

_held: dict[Path, int] = {}  # folders this process holds: a nested hold (a sweep's trial run) is no conflict
_held_guard = threading.Lock()


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def hold_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` (what: 'lorakit sft', 'lorakit merge'...) for the block; refuse at once
    if another process holds it. The folder's parent is created if needed (and removed again if left empty);
    the folder itself is not."""
    folder = Path(folder).absolute()
    with _held_guard:
        if folder in _held:
            _held[folder] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield lock_path(folder)
        finally:
            with _held_guard:
                _held[folder] -= 1
        return
    created = missing_parents(folder)
    fd, path = _acquire(folder, what)
    with _held_guard:
        _held[folder] = 1
    try:
        yield path
    finally:
        with _held_guard:
            del _held[folder]
        _release(fd, path)
        for parent in created:  # a run refused or failed before writing leaves no empty runs/ behind
            try:
                parent.rmdir()
            except OSError:
                break  # not empty: the run wrote into it


def missing_parents(folder: Path) -> list[Path]:
    """The folders above `folder` that do not exist yet, deepest first (the lock file's parent is created)."""
    missing, parent = [], folder.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def _acquire(folder: Path, what: str) -> tuple[int, Path]:
    import fcntl

    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"cannot create {path.parent}, the folder that holds {folder}: "
                             f"{error.strerror or error}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputDirError(f"cannot write beside {folder} (its lock file {path.name}): "
                                 f"{error.strerror or error}; choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirError(f"{folder} is in use by {describe(holder)}; nothing was changed. Wait for it to "
                                 "finish, or choose another output folder.") from None
        # The holder before us may have removed the file between our open and our lock: then we locked a file
        # nobody else will see. Only a lock on the file that is at `path` now counts.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read_holder(fd)
    if stale:
        click.echo(f"lorakit: taking over the lock of {folder} left by {describe(stale)}, which is no longer "
                   "running (it was stopped without releasing it)", err=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd, path


def _release(fd: int, path: Path) -> None:
    # Removed while still locked, so a writer that opens the path afterwards gets a new file (and the lock).
    try:
        path.unlink()
    except OSError:
        pass
    os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        holder = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def describe(holder: dict) -> str:
    """'lorakit sft (pid 4242 on host gpu-7, since 2026-01-02T10:00:00+0000)'."""
    if not holder or holder.get("unreadable"):
        return "another process (its lock file does not say which)"
    since = f", since {holder['started_at']}" if holder.get("started_at") else ""
    return f"{holder.get('command', 'a lorakit command')} (pid {holder.get('pid')} on host {holder.get('host')}{since})"
