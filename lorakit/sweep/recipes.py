"""A sweep's recipes: the recipe file without its `sweep:` section is the base; each trial's recipe is the base
with the trial's values set, checked exactly as the training command checks any recipe.

Before trial 1, `load_sweep_recipe` checks the section and then the recipes the space can produce: both ends of
every range and every choice (each grid point, for a grid), so a space that can make an invalid recipe is
reported by key and line before anything trains.
"""

from __future__ import annotations

import copy
import importlib
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import LorakitError, Problem, RecipeError
from lorakit.recipe.load import (
    apply_override,
    duplicate_problems,
    parse_override,
    read_with_overrides,
    read_yaml,
)
from lorakit.recipe.sections import Recipe
from lorakit.sweep import expressions
from lorakit.sweep.section import SectionChecker
from lorakit.sweep.space import Sweep

SECTION = "sweep"


@dataclass
class SweepRecipe:
    """A recipe file with a checked `sweep:` section."""

    file: Path
    data: dict  # the recipe as written, command-line overrides applied, without `sweep:`
    lines: Any  # lorakit.recipe.load.LineMap of the file
    overridden: set[tuple]
    sweep: Sweep
    folder: Path  # the sweep's folder: training.output_dir (or --output-dir); trials are trial-<n> inside

    @property
    def written(self) -> dict[str, Any]:
        """Every value written in the recipe, by dotted key (what an expression may read besides the space)."""
        return flatten(self.data)

    def values_for(self, sampled: dict[str, Any]) -> dict[str, Any]:
        return self.sweep.with_expressions(sampled, self.written)

    def trial_recipe(self, values: dict[str, Any], folder_name: str) -> Recipe:
        """The recipe of one trial, validated; `values` holds every searched key (expressions included)."""
        from lorakit.recipe.validation import Validator

        data = copy.deepcopy(self.data)
        for key, value in values.items():
            try:
                apply_override(data, key_parts(key), copy.deepcopy(value))
            except (KeyError, AttributeError, TypeError):
                raise RecipeError(self.file, [Problem(f"sweep.parameters.{key}", "no such entry in the recipe to set",
                                                      self.lines.get((SECTION, "parameters", key)))]) from None
        apply_override(data, ["training", "output_dir"], str(self.folder / folder_name))
        return Validator(self.file, self.lines, self.overridden, True, self.sweep.command).validate(data)

    def build_function(self) -> Callable:
        """The command's own `build(context)` (lorakit.commands.<command>.build_<command>)."""
        return find_build_function(self.sweep.command)


def key_parts(key: str) -> list:
    return parse_override(f"{key}=0")[0]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        dotted = f"{prefix}{key}"
        out[dotted] = child
        out.update(flatten(child, dotted + "."))
    return out


def has_sweep_section(file: str | os.PathLike) -> bool:
    try:
        data, _ = read_yaml(Path(file))
    except RecipeError:
        return False
    return SECTION in data


def find_build_function(command: str) -> Callable:
    name = f"build_{command}"
    try:
        module = importlib.import_module(f"lorakit.commands.{command}")
    except ModuleNotFoundError as error:
        if error.name == f"lorakit.commands.{command}":
            raise LorakitError(f"sweep.command: {command} is not part of this version of lorakit "
                               f"(lorakit/commands/{command}.py is missing)") from None
        raise
    build = getattr(module, name, None)
    if build is None:
        raise LorakitError(f"sweep.command: lorakit.commands.{command} has no {name}(context) for the sweep to call")
    return build


# ---------------------------------------------------------------- reading and checking


def load_sweep_recipe(file: str | os.PathLike, overrides: typing.Sequence[str] = (),
                      output_dir: str | os.PathLike | None = None) -> SweepRecipe:
    """Read the recipe, apply the overrides (sweep.* ones too), check the section and every recipe the space can
    produce; raise RecipeError listing every problem."""
    file = Path(file)
    data, lines, overridden = read_with_overrides(file, overrides)
    if output_dir:
        apply_override(data, ["training", "output_dir"], str(Path(output_dir).absolute()))
    section = data.pop(SECTION, None)
    if section is None:
        raise RecipeError(file, [Problem(SECTION, "required: lorakit sweep searches what the recipe's sweep: "
                                         "section names (objective, n_trials, parameters; see docs/sweep.md)", 1)])
    problems = duplicate_problems(lines)  # a key written twice: YAML would keep one silently
    checker = SectionChecker(lines, overridden)
    sweep = checker.read(section, flatten(data), has_eval(data))
    problems += sorted(checker.problems, key=lambda p: p.line or 0)
    for key in sorted({".".join(map(str, o)) for o in overridden}):
        if sweep and any(key == p.key or key.startswith(p.key + ".") for p in sweep.parameters + sweep.expressions):
            problems.append(Problem(key, "is searched by sweep.parameters; set it there or here, not both",
                                    source="command line"))
    if sweep is None or problems:
        raise RecipeError(file, problems)
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    written_folder = training.get("output_dir") if isinstance(training.get("output_dir"), str) else None
    folder = Path(written_folder or Path("runs") / file.stem).expanduser().absolute()
    recipe = SweepRecipe(file, data, lines, overridden, sweep, folder)
    problems = check_space(recipe)
    if problems:
        raise RecipeError(file, problems)
    return recipe


def recipe_for_validate(file: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> tuple[Recipe, str, str]:
    """For `lorakit validate` on a sweep: every check `lorakit sweep` makes before trial 1 (RecipeError when one
    fails), then the trial recipe with the space's largest values, which the data and memory checks then take;
    return it, the training command, and a line saying what was checked."""
    recipe = load_sweep_recipe(file, overrides)
    sweep = recipe.sweep
    largest = largest_point(sweep)
    note = (f"sweep: {sweep.n_trials} trials of lorakit {sweep.command}, {sweep.direction} {sweep.metric} "
            f"(sampler {sweep.sampler}, pruner {sweep.pruner}); all {len(candidate_points(sweep))} recipes checked "
            "at the ends of the space are valid; the checks below take its largest values: "
            + ", ".join(f"{key}={value!r}" for key, value in largest.items()))
    return recipe.trial_recipe(recipe.values_for(largest), "trial-0"), sweep.command, note


def has_eval(data: dict) -> bool:
    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    return bool(section.get("eval") or section.get("eval_fraction"))


def candidate_points(sweep: Sweep) -> list[dict[str, Any]]:
    """The sampled values whose recipes are checked: every grid point, or else every parameter at each of its
    extremes (the others at their first), and every parameter at its last."""
    if sweep.sampler == "grid":
        import itertools

        keys = [p.key for p in sweep.parameters]
        return [dict(zip(keys, point)) for point in itertools.product(*(p.grid_values() for p in sweep.parameters))]
    first = {p.key: p.extremes()[0] for p in sweep.parameters}
    points = [first, {p.key: p.extremes()[-1] for p in sweep.parameters}]
    for p in sweep.parameters:
        points += [{**first, p.key: value} for value in p.extremes()[1:-1]]
    unique = []
    for point in points:
        if point not in unique:
            unique.append(point)
    return unique


def largest_point(sweep: Sweep) -> dict[str, Any]:
    """Each parameter at its largest number (its first choice when the choices are not numbers): the recipe that
    needs the most memory, for `lorakit validate`."""
    point = {}
    for p in sweep.parameters:
        numbers = [v for v in p.extremes() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        point[p.key] = max(numbers) if len(numbers) == len(p.extremes()) else p.extremes()[0]
    return point


def check_space(recipe: SweepRecipe) -> list[Problem]:
    """Every problem of the recipes the space can produce, each named by the parameter that causes it."""
    sweep = recipe.sweep
    points = candidate_points(sweep)
    found: dict[tuple[str, str], tuple[Problem, dict]] = {}  # first problem of its kind, and the point it came from
    counts: dict[tuple[str, str], int] = {}
    valid: Recipe | None = None
    for point in points:
        try:
            values = recipe.values_for(point)
            trial = recipe.trial_recipe(values, "trial-0")
        except expressions.ExpressionError as error:
            key = getattr(error, "key", "")
            problems = [Problem(f"sweep.parameters.{key}.expr", str(error),
                                recipe.lines.get((SECTION, "parameters", key)))]
        except RecipeError as error:
            problems = [blame(problem, values, sweep) for problem in error.problems]
        else:
            valid = valid or trial
            continue
        for problem in problems:
            kind = (problem.path, problem.message)
            found.setdefault(kind, (problem, point))
            counts[kind] = counts.get(kind, 0) + 1
    problems = []
    for kind, (problem, point) in found.items():
        if counts[kind] < len(points) and not problem.path.startswith("sweep."):
            problem.message += " (when the sweep sets " + ", ".join(f"{k}={v!r}" for k, v in point.items()) + ")"
        problems.append(problem)
    if valid is not None:
        problems += check_trial_recipe(valid, recipe)
    return problems


def blame(problem: Problem, values: dict[str, Any], sweep: Sweep) -> Problem:
    """A problem in a searched key, told at that parameter's line in the sweep section, with the value at fault."""
    for p in sweep.parameters + sweep.expressions:
        if problem.path == p.key or problem.path.startswith(p.key + "."):
            where = "" if problem.path == p.key else f"{problem.path}: "
            shown = "" if problem.message.startswith("unknown key") else f" (the sweep can set it to {values[p.key]!r})"
            return Problem(f"sweep.parameters.{p.key}", f"{where}{problem.message}{shown}", p.line)
    return problem


def check_trial_recipe(trial: Recipe, recipe: SweepRecipe) -> list[Problem]:
    """What a valid trial recipe still needs for a sweep: the objective's data, one process, the command."""
    from lorakit.training.lifecycle import refuse_unsafe_settings

    sweep, lines, problems = recipe.sweep, recipe.lines, []

    def problem(path: tuple, message: str) -> None:
        problems.append(Problem(".".join(path), message, lines.get(path)))

    if sweep.metric.startswith("eval_") and not trial.has_eval:
        problem((SECTION, "objective", "metric"), f"{sweep.metric} needs evaluation data: set data.eval or "
                "data.eval_fraction, or optimise a training metric such as train_loss")
    if sweep.pruner != "none" and not trial.has_eval:
        problem((SECTION, "pruner"), "pruning compares intermediate evaluations: set data.eval or "
                "data.eval_fraction, or pruner: none")
    launch = trial.launch or {}
    if (launch.get("num_processes") or 1) > 1 or launch.get("accelerate_config"):
        problem(("launch",), "a sweep runs each trial in its own process on one device; to use several GPUs, "
                "start one `lorakit sweep` per GPU on the same study (docs/sweep.md)")
    try:
        refuse_unsafe_settings(trial)
    except LorakitError as error:
        where, _, message = str(error).partition(": ")
        problem(tuple(where.split(".")), message)
    try:
        recipe.build_function()
    except LorakitError as error:
        problem((SECTION, "command"), str(error).partition(": ")[2])
    return problems
