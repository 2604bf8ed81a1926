"""Prepared (tokenized) datasets, cached on disk under a key of everything that decides their tokens.

The key covers the data sources' content (sha256 of local files; the Hub dataset's own fingerprint), the data
settings, the seed, the tokenizer's saved files (vocabulary, special tokens, its config), the chat template text,
and the code that prepares the data; any change to one of them is a different entry, never a stale one.

Entries live in ${LORAKIT_CACHE:-~/.cache/lorakit}/data/<key>/ as Arrow (datasets' save_to_disk, no pickle) plus
reports.json, and are written to a temporary folder renamed into place, so a half-written entry is never read.
Deleting the folder at any time is safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

import lorakit
from lorakit.data import pipeline
from lorakit.data.pipeline import PreparedData, SourceReport, SplitReport
from lorakit.data import sources as data_sources

FORMAT = 1  # the layout of an entry; bumping it retires every older entry


def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit").expanduser() / "data"


# ---------------------------------------------------------------- fingerprints


def source_fingerprints(data_section: dict) -> dict[str, str]:
    """{source path: content fingerprint} for every train and eval source."""
    out = {}
    for source in (data_section.get("train") or []) + (data_section.get("eval") or []):
        out[source["path"]] = source_fingerprint(source)
    return out


def source_fingerprint(source: dict) -> str:
    path = Path(source["path"])
    if path.is_file():
        return _file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in data_sources.LOADERS):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0" + _file_sha256(file).encode())
        return "sha256:" + digest.hexdigest()
    # A Hub dataset: datasets' fingerprint of the loaded split follows its revision and files.
    return data_sources.source_fingerprint(source, data_sources.load_source(source))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer as it would be saved (vocabulary, merges, special tokens, chat template, config)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="lorakit-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def data_key(data_section: dict, seed: int, sources: dict[str, str], tokenizer) -> str:
    # Every module that turns rows into input_ids and labels: a change to any of them retires the cache.
    preparing_code = b"".join(Path(__file__).with_name(name).read_bytes()
                              for name in ("sources.py", "formats.py", "labels.py", "pipeline.py"))
    parts = {
        "format": FORMAT,
        "lorakit": lorakit.__version__,
        "code": hashlib.sha256(preparing_code).hexdigest(),
        "data": data_section,
        "seed": seed,
        "sources": sources,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": tokenizer.chat_template,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- the cache


def prepare_data(data_section: dict, tokenizer, seed: int, sources: dict[str, str]) -> tuple[Any, Path | None, bool]:
    """(PreparedData, its cache folder, whether it came from the cache): data.prepare_data, done once per key.

    The folder is None when the cache cannot be written (a read-only home): the data is then used uncached.
    """
    folder = cache_root() / data_key(data_section, seed, sources, tokenizer)
    if folder.is_dir():
        try:
            return load_entry(folder), folder, True
        except Exception:  # an entry damaged by hand (files deleted): prepared again and replaced
            shutil.rmtree(folder, ignore_errors=True)
    prepared = _prepare_without_datasets_cache(data_section, tokenizer, seed)
    try:
        save_entry(folder, prepared)
    except OSError as error:
        click.echo(f"lorakit: cannot write the data cache in {folder.parent} ({error.strerror or error}); "
                   "going on without it (set LORAKIT_CACHE to a writable folder)", err=True)
        return prepared, None, False
    return load_entry(folder), folder, False


def _prepare_without_datasets_cache(data_section: dict, tokenizer, seed: int) -> Any:
    """data.prepare_data with datasets' own map cache off: this cache is keyed on what decides the tokens, so
    nothing lorakit trains on can come from a datasets cache file keyed on something else."""
    import datasets

    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        return pipeline.prepare_data(data_section, tokenizer, seed=seed)
    finally:
        if was_enabled:
            datasets.enable_caching()


def save_entry(folder: Path, prepared: Any) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(tmp / "eval"))
        reports = {split: dataclasses.asdict(report) for split, report in prepared.reports.items()}
        (tmp / "reports.json").write_text(json.dumps(reports), encoding="utf-8")
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        # another process (another rank, another run) wrote the same entry first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_entry(folder: Path) -> Any:
    import datasets

    reports = json.loads((folder / "reports.json").read_text(encoding="utf-8"))
    train = datasets.load_from_disk(str(folder / "train"))
    eval_dataset = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return PreparedData(train=train, eval=eval_dataset,
                                    reports={split: _split_report(r) for split, r in reports.items()})


def _split_report(values: dict) -> Any:
    sources = [SourceReport(**s) for s in values.pop("sources")]
    return SplitReport(**values, sources=sources)
