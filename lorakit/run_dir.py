"""The output folder of a run: guarding what is already there, the run record, and reading a finished run back."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lorakit.errors import OutputDirError

RECIPE_FILE = "lorakit_recipe.yaml"
RECORD_FILE = "lorakit_run.json"
LIBRARIES = ("lorakit", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "tokenizers")

# Status values a run record can hold.
RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_record(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write the record atomically, so a crash never leaves half a file that later commands would misread."""
    path = Path(folder) / RECORD_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def update_record(folder: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    record = read_record(folder) or {}
    record.update(changes)
    record["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_record(folder, record)
    return record


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Trainer checkpoints in the folder, oldest first."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def prepare_output_dir(folder: Path, fingerprint: str, overwrite: bool) -> str:
    """Decide what to do with the output folder: 'new', 'resume' or 'overwrite'; refuse anything that would lose work.

    A folder that is not a lorakit run is never deleted, even with --overwrite.
    """
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        raise OutputDirError(f"output folder {folder} is a file; choose another --output-dir")
    entries = [p for p in folder.iterdir() if p.name not in (".DS_Store",)]
    if not entries:
        return "new"
    record = read_record(folder)
    if record is None:
        raise OutputDirError(
            f"output folder {folder} is not empty and is not a lorakit run; nothing was changed. "
            "Choose another --output-dir (lorakit never deletes files it did not write).")
    if overwrite:
        return "overwrite"
    same = record.get("recipe_fingerprint") == fingerprint
    if record.get("status") == COMPLETED:
        what = "this recipe" if same else "a different recipe"
        raise OutputDirError(f"output folder {folder} already holds a finished run of {what}; nothing was changed. "
                             "Use --overwrite to replace it, or choose another --output-dir.")
    if not same:
        raise OutputDirError(f"output folder {folder} holds an unfinished run of a different recipe; nothing was "
                             "changed. Use --overwrite to replace it, --resume-changed to continue it anyway, "
                             "or choose another --output-dir.")
    return "resume"


def clear_run(folder: Path) -> None:
    """Remove a previous lorakit run's files (only called for a folder holding a run record)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
