"""`lorakit init NAME [DEST]`: copy a shipped recipe to edit, never over an existing file.

The copy keeps the recipe's comments. Paths the recipe gives relative to its own folder (an embedded model or
data set, an accelerate config) are rewritten as absolute paths, so the copy works from wherever it is put.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import yaml

from lorakit.commands.recipes import read_header, recipe_name, recipes_dir, shipped_recipes
from lorakit.errors import LorakitError
from lorakit.recipe.schema import closest

# Recipe keys that may hold a path, as (section, key); data sources are handled apart.
PATH_KEYS = (("model", "name_or_path"), ("model", "chat_template"), ("launch", "accelerate_config"))


@click.command()
@click.argument("name")
@click.argument("dest", required=False, type=click.Path())
def command(name: str, dest: str | None) -> None:
    """Copy the shipped recipe NAME (see `lorakit recipes`) to DEST (default: ./NAME.yaml) to edit."""
    source = find_recipe(name)
    target = Path(dest) if dest else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if not target.parent.is_dir():
        raise LorakitError(f"{target.parent}: no such folder; create it first or choose another DEST")
    text = retarget_command(relocate_paths(source.read_text(encoding="utf-8"), source.parent), source, target)
    try:
        with target.open("x", encoding="utf-8") as handle:  # "x": fails rather than replace an existing file
            handle.write(text)
    except FileExistsError:
        raise LorakitError(f"{target} already exists; nothing was written. Choose another DEST, or move the "
                           "file away first") from None
    words = read_header(source).command.split()  # "lorakit dpo ...": the command that trains it
    training = words[1] if len(words) > 1 else "sft"
    click.echo(f"lorakit: wrote {target} (from {source}). Edit it, then: lorakit validate {target} && "
               f"lorakit {training} {target}")


def find_recipe(name: str) -> Path:
    stem = name.removesuffix(".yaml")
    available = {recipe_name(path): path for path in shipped_recipes()}
    if stem in available:
        return available[stem]
    suggestion = closest(stem, available)
    hint = f"did you mean {suggestion}? " if suggestion else ""
    raise LorakitError(f"no shipped recipe named {name!r}; {hint}`lorakit recipes` lists them "
                       f"({', '.join(sorted(available)) or f'none in {recipes_dir()}'})")


def relocate_paths(text: str, folder: Path) -> str:
    """The recipe text with every path that exists relative to `folder` written as an absolute path."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        return text
    sections = {key.value: value for key, value in root.value}
    scalars = []
    for section, key in PATH_KEYS:
        node = _get(sections.get(section), key)
        if node is not None:
            scalars.append(node)
    data = sections.get("data")
    for split in ("train", "eval"):
        sources = _get(data, split)
        items = sources.value if isinstance(sources, yaml.SequenceNode) else [sources] if sources else []
        for item in items:
            scalars.append(item if isinstance(item, yaml.ScalarNode) else _get(item, "path"))
    replacements = []
    for node in scalars:
        if not isinstance(node, yaml.ScalarNode) or not isinstance(node.value, str) or os.path.isabs(node.value):
            continue
        local = folder / node.value
        if node.value and local.exists():
            replacements.append((node.start_mark.index, node.end_mark.index, json.dumps(str(local.resolve()))))
    for start, end, value in sorted(replacements, reverse=True):
        text = text[:start] + value + text[end:]
    return text


def _get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((value for k, value in node.value if k.value == key), None)


def retarget_command(text: str, source: Path, target: Path) -> str:
    """Make the opening comments' commands name the copy instead of the shipped file."""
    lines = text.splitlines(keepends=True)
    shipped = f"recipes/{source.name}"
    for index, line in enumerate(lines):
        if not line.startswith("#"):
            break
        lines[index] = line.replace(shipped, str(target))
    return "".join(lines)
