"""Loading one data source: a local file or folder (json, jsonl, csv, parquet, arrow, txt) or a Hub dataset."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lorakit.data.formats import FORMAT_COLUMNS
from lorakit.errors import DataError

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
# Text formats, which datasets reads as UTF-8 only (a JSON Lines file in another encoding even loads, and fails
# later, when a row is read).
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")


def load_source(source: dict) -> Any:
    """A datasets.Dataset for one recipe source: a local file or folder, or a Hub dataset."""
    import datasets

    path = source["path"]
    local = Path(path)
    try:
        if local.is_file():
            loader = LOADERS.get(local.suffix.lower())
            if loader is None:
                raise DataError(f"{path}: unsupported file type {local.suffix!r}; use one of {', '.join(LOADERS)}")
            check_utf8(local)
            return load_local(loader, str(local))
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.suffix.lower() in LOADERS)
            if not files:
                raise DataError(f"{path}: folder holds no data files ({', '.join(LOADERS)})")
            kinds = {LOADERS[p.suffix.lower()] for p in files}
            if len(kinds) > 1:
                raise DataError(f"{path}: folder mixes file types ({', '.join(sorted(kinds))}); give the files "
                                "as separate sources")
            for file in files:
                check_utf8(file)
            return load_local(kinds.pop(), [str(p) for p in files])
        return datasets.load_dataset(path, name=source.get("name"), split=source.get("split", "train"),
                                     revision=source.get("revision"))
    except DataError:
        raise
    except Exception as error:  # datasets' own errors are long and deep; say what and where
        raise DataError(_explain_load_error(path, error)) from None


def load_renamed(source: dict) -> Any:
    """load_source, then the source's `columns:` renames ({lorakit's name: the data's column})."""
    name = source["path"]
    dataset = load_source(source)
    renames = {src: dst for dst, src in (source.get("columns") or {}).items()}
    missing = [src for src in renames if src not in dataset.column_names]
    if missing:
        raise DataError(f"{name}: columns: names {', '.join(missing)}, which the data does not have "
                        f"(it has {', '.join(dataset.column_names)})")
    return dataset.rename_columns(renames) if renames else dataset


def load_local(loader: str, files: str | list[str]) -> Any:
    """datasets' load of local files, without its "Generating train split" bar: converting a local file takes
    a moment and the bar says nothing to the user (a Hub dataset's download keeps its bars)."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(loader, data_files=files, split="train")
    finally:
        if shown:
            datasets.enable_progress_bars()


def check_utf8(file: Path) -> None:
    """A text data file that is not UTF-8 is named with its first bad line, and how to convert it."""
    if file.suffix.lower() not in TEXT_SUFFIXES:
        return
    with file.open("rb") as handle:
        for number, line in enumerate(handle, 1):  # no UTF-8 sequence holds a newline byte: lines decode alone
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                start = max(0, error.start - 15)
                nearby = line[start:error.start + 15].decode("latin-1").strip()
                converted = file.with_name(f"{file.stem}.utf8{file.suffix}")
                raise DataError(
                    f"{file}: line {number} is not UTF-8 (byte 0x{line[error.start]:02x} at byte {error.start + 1} "
                    f"of the line, in {nearby!r} as Latin-1 reads it); data files must be UTF-8. Convert it once, "
                    f"e.g. from Latin-1 or Windows-1252: iconv -f cp1252 -t utf-8 {file} > {converted}") from None


def _explain_load_error(path: str, error: Exception) -> str:
    local = Path(path)
    if local.is_file() and local.suffix.lower() in (".json", ".jsonl"):
        bad = _first_bad_json_line(local)
        if bad:
            return f"{path}: row {bad[0]} is not valid JSON ({bad[1]})"
    if not local.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"{path}: not a local file or folder, and the Hub is off (HF_HUB_OFFLINE=1), so it cannot be downloaded"
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{path}: cannot be loaded: {message}"


def _first_bad_json_line(file: Path) -> tuple[int, str] | None:
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as error:
            return error.lineno, error.msg
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                return number, error.msg
            if not isinstance(value, dict):
                return number, "each line must be a JSON object"
    return None


def detect_format(columns: list[str], name: str) -> str:
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    raise DataError(f"{name}: cannot tell the format from its columns ({', '.join(columns)}). Columns expected per "
                    f"format: {expected}. Set format: and columns: {{format_name: your_column}} on the source.")


def source_fingerprint(source: dict, dataset: Any) -> str:
    """sha256 of a local file's bytes, else the dataset's own fingerprint (Hub revision + content)."""
    path = Path(source["path"])
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return "sha256:" + digest.hexdigest()
    return "datasets:" + str(getattr(dataset, "_fingerprint", "unknown"))
