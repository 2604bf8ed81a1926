"""The output folder of a run: guarding what is already there, the run record, the list of files the run wrote,
checkpoints (complete, verified), reading a run back."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from lorakit.errors import OutputDirError

RECIPE_FILE = "lorakit_recipe.yaml"
RECORD_FILE = "lorakit_run.json"
# The top-level files and folders the run wrote, so --overwrite removes those and nothing of the user's.
MANIFEST_FILE = "lorakit_files.json"
# Always lorakit's: its own records, and the report `lorakit eval` writes into the run folder by default.
OWN_FILES = (RECIPE_FILE, RECORD_FILE, MANIFEST_FILE, "lorakit_eval.json")
# What a run folder written before the manifest existed holds: peft's adapter, the tokenizer, the loss plot.
UNLISTED_RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                      "chat_template.jinja", "loss.png")
# Written into a checkpoint folder after every other file of it is on disk; a checkpoint without it is never used.
COMPLETE_MARKER = "lorakit_complete.json"
# Written just before the marker: the sha256 of every file the marker lists, in `sha256sum -c` format.
CHECKSUMS = COMPLETE_MARKER + ".sha256"
LIBRARIES = ("lorakit", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "tokenizers")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

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


# ---------------------------------------------------------------- the run record


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
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a full disk: the record before stays whole, no half-written copy is left beside it
        tmp.unlink(missing_ok=True)
        raise


def update_record(folder: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    record = read_record(folder) or {}
    record.update(changes)
    record["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_record(folder, record)
    return record


def require_completed(folder: str | os.PathLike) -> dict[str, Any]:
    """The record of a finished run; anything else (running, interrupted, failed, not a run) is refused.

    For commands that publish or build on a run (push, merge): a diverged or half-trained adapter must never
    leave the machine as if it were fine.
    """
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        raise OutputDirError(f"{folder} is not a lorakit run folder (no {RECORD_FILE})")
    status = record.get("status")
    if status == COMPLETED:
        return record
    failure = record.get("failure") or {}
    why = f": {failure['message']}" if failure.get("message") else ""
    if status == INTERRUPTED:
        why = "; run the same `lorakit sft` command again to resume it"
    status = status or "unfinished"
    article = "an" if status[0] in "aeiou" else "a"
    raise OutputDirError(f"{folder} holds {article} {status} run, not a finished one{why}")


@dataclass(frozen=True)
class Fingerprint:
    """What decides the trained weights: the resolved recipe and the content of every data source."""

    recipe: str
    data: dict[str, str] = field(default_factory=dict)
    # The recipe's settings that decide the weights (Recipe.weight_settings), to name what changed; not hashed.
    settings: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def value(self) -> str:
        text = json.dumps({"recipe": self.recipe, "data": self.data}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_record(self) -> dict[str, Any]:
        return {"fingerprint": self.value, "fingerprint_parts": {"recipe": self.recipe, "data": self.data}}


# ---------------------------------------------------------------- checkpoints


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Trainer checkpoint folders, complete or not, oldest first. Symlinks are never followed (nor deleted through)."""
    found = []
    for path in Path(folder).glob("checkpoint-*"):
        if CHECKPOINT_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            found.append(path)
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def is_complete(checkpoint: Path) -> bool:
    """True when the marker is there and every file it lists still has the size it had when the save finished."""
    try:
        marker = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))
        return all((checkpoint / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    return [c for c in checkpoints(folder) if is_complete(c)]


def latest_complete_checkpoint(folder: str | os.PathLike) -> Path | None:
    complete = complete_checkpoints(folder)
    return complete[-1] if complete else None


def mark_complete(checkpoint: Path, step: int) -> None:
    """Flush the checkpoint's files to disk, then write the marker (atomically): the marker is always the last write.

    The flush matters on preemptible machines that lose power rather than processes: without it, the marker could
    reach the disk before the optimizer state it vouches for. The checksums let a resume tell a checkpoint damaged
    since (same size, other bytes) from a sound one (lorakit.training.checkpoint_check).
    """
    files, sums = {}, []
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and not p.name.startswith(COMPLETE_MARKER)):
        _fsync(path)
        name = path.relative_to(checkpoint).as_posix()
        files[name] = path.stat().st_size
        sums.append(f"{sha256_of(path)}  {name}\n")  # read back from the page cache just written: cheap for LoRA
    (checkpoint / CHECKSUMS).write_text("".join(sums), encoding="utf-8")
    _fsync(checkpoint / CHECKSUMS)
    marker = checkpoint / COMPLETE_MARKER
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, marker)
    _fsync(checkpoint)


def unmark(checkpoint: Path) -> None:
    """Withdraw the marker of a checkpoint about to be written again (a save at the step it was resumed from)."""
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)


def remove_incomplete_checkpoints(folder: str | os.PathLike) -> list[str]:
    """Delete checkpoints whose save never finished (the process died while writing them); return their names."""
    removed = []
    for checkpoint in checkpoints(folder):
        if not is_complete(checkpoint):
            shutil.rmtree(checkpoint)
            removed.append(checkpoint.name)
    return removed


def prune_checkpoints(folder: str | os.PathLike, keep: int | None, protect: str | os.PathLike | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (and `protect`, the best one); delete the older ones.

    Done here rather than by transformers' save_total_limit, which prunes before lorakit's marker is written and
    counts incomplete checkpoints: it could delete the last complete checkpoint in favour of one still being written.
    """
    if not keep or keep <= 0:
        return
    complete = complete_checkpoints(folder)
    protected = Path(protect).resolve() if protect else None
    for checkpoint in complete[:-keep]:
        if checkpoint.resolve() != protected:
            shutil.rmtree(checkpoint)


def remove_checkpoints(folder: str | os.PathLike) -> None:
    for checkpoint in checkpoints(folder):
        shutil.rmtree(checkpoint)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- what to do with the output folder


def prepare_output_dir(folder: Path, fingerprint: Fingerprint, overwrite: bool = False, *, resume_changed: bool = False,
                       no_resume: bool = False) -> str:
    """Decide what to do with the output folder: 'new', 'resume' or 'overwrite'; refuse anything that would lose work.

    An unfinished run of the same recipe and data is resumed (even with --overwrite: --no-resume is the way to
    start it over). A folder that is not a lorakit run is never deleted, even with --overwrite.
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
    same = record.get("fingerprint") == fingerprint.value
    if overwrite or no_resume:
        refuse_data_inside(folder, fingerprint)
    if record.get("status") == COMPLETED:
        if overwrite:
            return "overwrite"
        what = "this recipe and data" if same else describe_change(record, fingerprint, folder)
        raise OutputDirError(f"output folder {folder} already holds a finished run of {what}; nothing was changed. "
                             "Use --overwrite to replace it, or choose another --output-dir.")
    if no_resume:
        return "overwrite"  # the caller has checked that --overwrite came with it
    if same or resume_changed:
        return "resume"
    if overwrite:
        return "overwrite"
    raise OutputDirError(f"output folder {folder} holds an unfinished run of "
                         f"{describe_change(record, fingerprint, folder)}; "
                         "nothing was changed. Use --resume-changed to continue it anyway, --overwrite to replace it, "
                         "or choose another --output-dir.")


def describe_change(record: dict[str, Any], fingerprint: Fingerprint, folder: Path | None = None) -> str:
    """'a different recipe (lora.r: 16 -> 4)', 'different data (train.jsonl)'... from what the record and the
    resolved recipe kept of the earlier run."""
    before = record.get("fingerprint_parts") or {}
    if not before:
        return "a different recipe or data"
    changed = []
    if before.get("recipe") != fingerprint.recipe:
        keys = changed_keys(folder / RECIPE_FILE, fingerprint.settings) if folder and fingerprint.settings else []
        shown = "; ".join(keys[:5]) + (f"; and {len(keys) - 5} more" if len(keys) > 5 else "")
        changed.append(f"a different recipe ({shown})" if keys else "a different recipe")
    old_data, new_data = before.get("data") or {}, fingerprint.data
    names = sorted(name for name in set(old_data) | set(new_data) if old_data.get(name) != new_data.get(name))
    if names:
        changed.append("different data (" + ", ".join(Path(n).name for n in names) + ")")
    return " and ".join(changed) or "a different recipe or data"


def changed_keys(earlier_recipe: Path, now: dict[str, Any]) -> list[str]:
    """'lora.r: 16 -> 4' for each setting that differs between the earlier run's resolved recipe and `now`."""
    import yaml

    from lorakit.recipe.sections import NOT_WEIGHT_SETTINGS

    try:
        before = yaml.safe_load(earlier_recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(before, dict):
        return []
    before.pop("evaluation", None)
    for key in NOT_WEIGHT_SETTINGS:
        (before.get("training") or {}).pop(key, None)

    def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}{key}.").items()}
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): value}

    old, new = leaves(before), leaves(json.loads(json.dumps(now, default=str)))
    return [f"{key}: {old.get(key, 'unset')} -> {new.get(key, 'unset')}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not (old.get(key) == "<redacted>")]


def refuse_data_inside(folder: Path, fingerprint: Fingerprint) -> None:
    """--overwrite replaces a run folder: never one the recipe reads its own data from."""
    root = folder.resolve()
    for source in fingerprint.data:
        path = Path(source)
        if path.exists() and path.resolve().is_relative_to(root):
            raise OutputDirError(
                f"the recipe's data {path} lies inside the output folder {folder}, which --overwrite would replace; "
                "nothing was changed. Move the data out of the run folder, or choose another --output-dir.")


def clear_run(folder: Path) -> None:
    """Remove what an earlier lorakit run wrote into `folder` (listed in its manifest, else lorakit's known names,
    and checkpoints), saying what goes and what stays: anything else in the folder is the user's and is kept."""
    listed = run_files(folder)
    removed, kept = [], []
    for entry in sorted(folder.iterdir()):
        ours = entry.name in listed or (CHECKPOINT_NAME.fullmatch(entry.name) and entry.is_dir())
        (removed if ours else kept).append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    click.echo(f"lorakit: --overwrite: removed the earlier run's files from {folder}: {', '.join(removed) or 'none'}")
    if kept:
        click.echo(f"lorakit: kept, as lorakit did not write them: {', '.join(kept)}")


def run_files(folder: Path) -> set[str]:
    """The top-level names a run wrote into `folder`: its manifest, else (an older run) lorakit's known names."""
    try:
        listed = set(json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set(UNLISTED_RUN_FILES)
    return listed | set(OWN_FILES)


# What the folder held when training ended: what appears after that (adapter, tokenizer, card, plot) is the run's.
_at_training_end: dict[Path, dict[str, int]] = {}


def folder_state(folder: str | os.PathLike) -> dict[str, int]:
    """{top-level name: modification time} of a folder's entries."""
    try:
        return {entry.name: entry.stat(follow_symlinks=False).st_mtime_ns for entry in Path(folder).iterdir()}
    except OSError:
        return {}


def mark_training_ended(folder: str | os.PathLike) -> None:
    _at_training_end[Path(folder).absolute()] = folder_state(folder)


def record_outputs(folder: str | os.PathLike) -> None:
    """Add to the manifest what the run wrote once training had ended: new or rewritten entries since then.

    Only that stretch counts: during training lorakit writes its records and checkpoints (known by name) and
    nothing else, so a file the user drops into the folder while it trains is never taken for the run's.
    """
    folder = Path(folder)
    before = _at_training_end.pop(folder.absolute(), None)
    if before is None or not folder.is_dir():
        return  # the run never trained (refused, or failed before): it wrote nothing to list
    written = set(OWN_FILES) | {name for name, changed in folder_state(folder).items()
                                if before.get(name) != changed and not CHECKPOINT_NAME.fullmatch(name)}
    try:
        listed = set(json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    path = folder / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps({"files": sorted(listed | written)}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a full disk: the earlier manifest stays, and lorakit's own names are always known
        tmp.unlink(missing_ok=True)
