"""Reading a recipe: YAML with line numbers, command-line overrides, then validation.

Everything is checked before any model or data is loaded, and every problem is reported at once as
`section.key (line N): what is wrong`.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import Problem, RecipeError
from lorakit.recipe.sections import Recipe

# ---------------------------------------------------------------- loading


class LineMap:
    """Maps a dotted key path to the line of the YAML file where it was written."""

    def __init__(self, node: yaml.Node | None):
        self.lines: dict[tuple, int] = {}
        # (path, first line, line of the repeat): YAML itself keeps the last value without a word.
        self.duplicates: list[tuple[tuple, int, int]] = []
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                line = key_node.start_mark.line + 1
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                if key in seen:
                    self.duplicates.append((child, seen[key], line))
                else:
                    seen[key] = line
                self._walk(value_node, child)
                self.lines[child] = line  # the value YAML keeps is the last one written
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, path + (index,))

    def get(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def read_yaml(file: Path) -> tuple[dict, LineMap]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(file, [Problem("recipe", f"file not found: {file}")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise RecipeError(file, [Problem("recipe", f"cannot read {file}: {error}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(error, "problem", None) or str(error)
        raise RecipeError(file, [Problem("recipe", f"not valid YAML: {reason}", line)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(file, [Problem("recipe", "must be a mapping of sections (model, data, lora, training, ...)", 1)])
    return data, LineMap(node)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """'training.learning_rate=1e-4' -> (['training', 'learning_rate'], 1e-4)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(None, [Problem(text, "an override is written section.key=value", source="command line")])
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict, parts: list, value: Any) -> None:
    target = data
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                raise KeyError(".".join(map(str, parts[: depth + 1])))
            target = target[part]
            continue
        if target.get(part) is None:
            target[part] = [] if isinstance(nxt, int) else {}
        target = target[part]
    last = parts[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last > len(target):
            raise KeyError(".".join(map(str, parts)))
        if last == len(target):
            target.append(value)
        else:
            target[last] = value
    else:
        target[last] = value


def read_with_overrides(file: Path, overrides: typing.Sequence[str]) -> tuple[dict, dict, set[tuple]]:
    """The recipe file's mapping with the command line's `key.path=value` overrides applied; its line numbers;
    the key paths overridden."""
    data, lines = read_yaml(file)
    overridden: set[tuple] = set()
    for text in overrides:
        parts, value = parse_override(text)
        try:
            apply_override(data, parts, value)
        except (KeyError, AttributeError, TypeError):
            raise RecipeError(file, [Problem(".".join(map(str, parts)), "no such entry to override",
                                             source="command line")]) from None
        overridden.add(tuple(parts))
    return data, lines, overridden


def with_output_dir(overrides: typing.Sequence[str], output_dir: str | os.PathLike | None) -> tuple[str, ...]:
    """OVERRIDES with a command's --output-dir as an absolute training.output_dir (it wins over the recipe's)."""
    if not output_dir:
        return tuple(overrides)
    return (*overrides, f"training.output_dir={Path(output_dir).absolute()}")


def load_recipe(file: str | os.PathLike, overrides: typing.Sequence[str] = (), check_paths: bool = True,
                command: str = "sft") -> Recipe:
    """Read, override, validate and resolve a recipe for a training `command` (sft, dpo, classify: it decides
    the class behind `training:` and the command's own sections); raise RecipeError listing every problem."""
    file = Path(file)
    data, lines, overridden = read_with_overrides(file, overrides)
    from lorakit.recipe.validation import Validator

    duplicates = duplicate_problems(lines)
    try:
        recipe = Validator(file, lines, overridden, check_paths, command).validate(data)
    except RecipeError as error:
        raise RecipeError(file, duplicates + error.problems) from None
    if duplicates:
        raise RecipeError(file, duplicates)
    return recipe


def duplicate_problems(lines: LineMap) -> list[Problem]:
    """A key written twice in one mapping: the user meant one of the two, and YAML would silently take the last."""
    problems = []
    for path, first, again in lines.duplicates:
        dotted = ".".join(str(p) for p in path)
        problems.append(Problem(dotted, f"written twice, at lines {first} and {again}; YAML would silently keep the "
                                        "second: keep only the one you mean", first))
    return problems


def line_of(file: str | os.PathLike, path: tuple) -> int | None:
    """The line where a recipe file sets exactly `path` (for problems found after loading, such as a model's
    modules); None when the file does not set it (a default, or an override on the command line)."""
    try:
        return read_yaml(Path(file))[1].lines.get(path)
    except RecipeError:
        return None
