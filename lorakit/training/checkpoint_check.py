"""Whether a complete checkpoint is still what was saved, before a run resumes from it.

A checkpoint's completion marker (lorakit_complete.json, see run_dir.mark_complete) lists the size of every file
as the save left it, and lorakit_complete.json.sha256 beside it their sha256 (`sha256sum -c` reads it too). A file changed since (a disk or copy error, a truncated sync) is found here, and
resume falls back to the newest checkpoint that is still sound instead of dying inside safetensors or torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lorakit.training.run_dir import CHECKSUMS, COMPLETE_MARKER, complete_checkpoints, sha256_of


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files now, or None: each must have the sha256 its marker took
    when the save finished (checkpoints saved without checksums: the size), and a safetensors file a sound
    header.

    Costs one read of the checkpoint (LoRA checkpoints are small), so it is done once, on the one resumed from.
    """
    try:
        marker = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))
        sizes = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE_MARKER} cannot be read"
    hashes = read_checksums(checkpoint / CHECKSUMS)
    for name, size in sizes.items():
        path = checkpoint / name
        try:
            if path.stat().st_size != size:
                return f"{name} has changed size since it was saved"
            if name in hashes and sha256_of(path) != hashes[name]:
                return f"{name} does not match the sha256 taken when it was saved"
        except OSError as error:
            return f"{name} cannot be read ({error.strerror or error})"
        if name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem:
                return f"{name}: {problem}"
    return None


def read_checksums(path: Path) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum` file; empty when there is none (a checkpoint of an older lorakit)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    return {name: digest for digest, _, name in (line.partition("  ") for line in lines) if name}


def safetensors_problem(path: Path) -> str | None:
    """A cheap look at a safetensors file: a JSON header of sane size whose tensors fill the rest exactly."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > min(size - 8, 100 << 20):
            return f"not a safetensors file (a header of {length} bytes in a file of {size})"
        try:
            header = json.loads(handle.read(length))
            end = max([0] + [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not the JSON of a safetensors file"
    if 8 + length + end != size:
        return f"its tensors take {end} bytes, the file holds {size - 8 - length} after the header"
    return None


def latest_sound_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint whose files are still as they were saved."""
    return next((c for c in reversed(complete_checkpoints(folder)) if checkpoint_damage(c) is None), None)


def remove_damaged_checkpoints(folder: str | Path) -> list[tuple[str, str]]:
    """Delete complete checkpoints newer than the newest sound one, whose files changed after they were saved
    (a disk error, a bad copy); return (name, what is wrong). Resume then falls back to the sound one."""
    removed = []
    for checkpoint in reversed(complete_checkpoints(folder)):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            break
        shutil.rmtree(checkpoint)
        removed.append((checkpoint.name, damage))
    return removed
