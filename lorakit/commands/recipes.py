"""`lorakit recipes`: the recipes that ship with lorakit, one line each, read from each file's opening comments.

Every shipped recipe opens with comment lines: the command that runs it, then `# About:`, `# Hardware:` and
`# Peak memory:` (tests/test_recipes.py holds them to it). The library is the `recipes/` folder of a lorakit
checkout, next to the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import click

import lorakit
from lorakit.errors import LorakitError

HEADER_KEY = re.compile(r"^#\s*(About|Hardware|Peak memory):\s*(.*)$")


@dataclass
class Header:
    command: str = ""
    about: str = ""
    hardware: str = ""
    peak_memory: str = ""


def recipes_dir() -> Path:
    """The recipe library: `recipes/` beside the lorakit package, as in a source checkout."""
    folder = Path(lorakit.__file__).resolve().parent.parent / "recipes"
    if not folder.is_dir():
        raise LorakitError(f"no recipe library at {folder}: the recipes ship with lorakit's source, not with the "
                           "installed package. Install lorakit from a clone of its repository (pip install -e .) "
                           "to get them")
    return folder


# Recipes for the other training commands live in a folder of their own, listed as FOLDER/NAME.
COMMAND_FOLDERS = ("classify", "dpo")


def shipped_recipes() -> list[Path]:
    folder = recipes_dir()
    return sorted(folder.glob("*.yaml")) + [path for name in COMMAND_FOLDERS
                                            for path in sorted((folder / name).glob("*.yaml"))]


def recipe_name(path: Path) -> str:
    """How `lorakit recipes` lists a recipe and `lorakit init` takes it: `quickstart`, `dpo/quickstart-dpo`."""
    return path.relative_to(recipes_dir()).with_suffix("").as_posix()


def read_header(path: Path) -> Header:
    """The recipe's opening comment lines: its command and its About, Hardware and Peak memory lines."""
    header = Header()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        match = HEADER_KEY.match(line)
        if match:
            field = match.group(1).lower().replace(" ", "_")
            setattr(header, field, match.group(2).strip())
        elif not header.command and "lorakit " in line:
            header.command = line.lstrip("# ").strip()
    return header


@click.command()
def command() -> None:
    """List the shipped recipes: what each trains, the hardware it was sized for and its peak memory."""
    paths = shipped_recipes()
    if not paths:
        raise LorakitError(f"{recipes_dir()} holds no recipes (*.yaml)")
    width = max(len(recipe_name(p)) for p in paths)
    for path in paths:
        header = read_header(path)
        # The header's parentheses (examples of cards, how a figure was made) are for the file, not the list.
        details = "; ".join(part.split(" (")[0] for part in (header.about, header.hardware, header.peak_memory)
                            if part)
        click.echo(f"{recipe_name(path):<{width}}  {details or '(no description in its header)'}")
    click.echo(f"\nlorakit init NAME [DEST] copies one to edit; lorakit validate checks it. Files: {recipes_dir()}")
