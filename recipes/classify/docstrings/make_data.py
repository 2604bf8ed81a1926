#!/usr/bin/env python
"""Build the data of recipes/classify/quickstart.yaml: which standard-library package a docstring comes from.

Every docstring (module, class, function) of eight packages of the CPython standard library that runs this
script, labelled with its package. The text is real, written by CPython's authors, and ships with every Python
under the Python Software Foundation License; nothing is downloaded.

* Packages: asyncio, email, http, importlib, logging, tkinter, unittest, xml (test suites left out).
* A docstring is kept when it has at least 5 words; one that occurs in two packages (or twice) is left out, so
  no text is in both splits and none has two answers.
* Held out for testing: a fifth of the docstrings, chosen by a hash of the text (stable across runs and
  machines, and independent of the order files are read in).

Run from the repository root:

    python recipes/classify/docstrings/make_data.py

The committed files were written by CPython 3.11.7, the standard library the quickstart base model was
pretrained on. Another Python version gives somewhat different rows.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import platform
import sysconfig
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "tkinter", "unittest", "xml")
EXCLUDED_DIRS = {"test", "tests", "idle_test", "__pycache__"}
MIN_WORDS = 5
TEST_PERCENT = 20


def docstrings(file: Path) -> list[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text and len(text.split()) >= MIN_WORDS:
                found.append(text.strip())
    return found


def is_test(text: str) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 100 < TEST_PERCENT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=HERE / "data")
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows: dict[str, set[str]] = {}  # text -> the packages it occurs in
    seen = Counter()
    for package in PACKAGES:
        files = sorted((stdlib / package).rglob("*.py"))
        for file in files:
            if any(part in EXCLUDED_DIRS for part in file.relative_to(stdlib).parts):
                continue
            for text in docstrings(file):
                rows.setdefault(text, set()).add(package)
                seen[text] += 1
    kept = sorted((text, packages.pop()) for text, packages in rows.items() if len(packages) == 1 and seen[text] == 1)
    splits = {"train": [], "test": []}
    for text, package in kept:
        splits["test" if is_test(text) else "train"].append({"text": text, "label": package})
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        with (args.output_dir / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in split:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts = Counter(row["label"] for row in split)
        print(f"{name}: {len(split)} rows; " + ", ".join(f"{p} {counts[p]}" for p in PACKAGES))
    print(f"(from {stdlib}, Python {platform.python_version()})")


if __name__ == "__main__":
    main()
