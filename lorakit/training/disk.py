"""The disk under a run's output folder: writable before anything is loaded, and a full disk told in one message.

A run that cannot write its folder should say so before minutes of loading, not in a traceback from the
Trainer's makedirs; a disk that fills up mid-run should end with what was kept and how to go on, not with an
OSError from whichever writer hit it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from lorakit.errors import DiskFull, OutputDirError
from lorakit.training.run_dir import (FAILED, checkpoints, is_complete, latest_complete_checkpoint, read_record,
                                      update_record)


def check_writable(folder: Path) -> None:
    """One line naming the output folder when it cannot be written, before any model or data is loaded."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputDirError(f"output folder {folder}: {existing} is a file; choose another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (it would be created in {existing}, which is not writable)"
        raise OutputDirError(f"output folder {folder} is not writable{where}; nothing was loaded. Choose a folder "
                             "you can write to with --output-dir or training.output_dir")


def disk_full(error: BaseException, folder: Path) -> DiskFull | None:
    """The error to tell when `error` (or what caused it) is a full disk; None for any other error.

    Writers say it their own way: OSError errno 28 (Python), "No space left on device" in safetensors' error,
    "file write failed" from torch.save's zip writer (then the free space decides).
    """
    found, seen, cause = [], set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        if ((isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "No space left on device" in text
                or ("file write failed" in text and free_space(folder) < 256 << 20)):
            found.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not found:
        return None
    # The first write that failed names its file; a later one (the run record, written on the way out) may not.
    where = next((c.filename for c in reversed(found) if getattr(c, "filename", None)), None)
    last = latest_complete_checkpoint(folder) if folder.is_dir() else None
    if where is None:  # torch's writer does not say which file: the checkpoint being saved, if one is
        unfinished = [c for c in checkpoints(folder) if not is_complete(c)] if folder.is_dir() else []
        where = unfinished[-1] if unfinished else folder
    kept = (f"the last complete checkpoint, {last.name}, is kept" if last else "no checkpoint had been saved yet")
    message = (f"the disk is full: writing {where} failed ({free_space(folder) / 2**20:,.0f} MiB free on the disk "
               f"holding {folder}). {kept.capitalize()}. Free some space, then run the same command again: it "
               "resumes" + (f" from {last.name}." if last else "."))
    try:
        if read_record(folder) is not None:
            update_record(folder, status=FAILED, failure={"reason": "disk full", "message": message})
    except OSError:
        pass  # the disk is still full: the record says "running" or "failed", and resume works the same
    return DiskFull(message)


def free_space(folder: Path) -> int:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return 0
