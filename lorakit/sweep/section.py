"""Reading the `sweep:` section into a Sweep (lorakit/sweep/space.py), every problem of the section on its own
(types, ranges, names, Optuna's options) collected with its YAML line; whether each sampled recipe is a valid
recipe is checked in recipes.py."""

from __future__ import annotations

import importlib
import inspect
import json
import math
from typing import Any

from lorakit.errors import Problem
from lorakit.recipe.schema import closest
from lorakit.sweep import expressions
from lorakit.sweep.space import COMMANDS, PRUNERS, SAMPLERS, Parameter, Sweep

SECTION_KEYS = ("command", "objective", "n_trials", "sampler", "pruner", "parameters")
OBJECTIVE_KEYS = ("metric", "direction")
PARAMETER_KEYS = ("type", "low", "high", "log", "step", "choices", "expr")
TYPES = ("float", "int", "categorical")
# A grid larger than this is better searched by sampling (and checking each point would take long).
MAX_GRID = 10_000
# Keys a trial cannot take from the space: the sweep decides them, or they would fight its own resume.
NOT_SEARCHABLE = {
    "training.output_dir": "each trial runs in <output_dir>/trial-<n>; set the sweep's folder with "
                           "training.output_dir or --output-dir",
    "launch": "each trial runs in the sweep's process; start one sweep per GPU instead (docs/sweep.md)",
}


class SectionChecker:
    """Reads the section into a Sweep, collecting every problem with its YAML line."""

    def __init__(self, lines: Any, from_command_line: set[tuple]):
        self.lines = lines
        self.from_command_line = from_command_line
        self.problems: list[Problem] = []

    def problem(self, path: tuple, message: str) -> None:
        full = ("sweep", *path)
        cli = any(full[: len(o)] == o for o in self.from_command_line)
        self.problems.append(Problem(".".join(map(str, full)), message, self.lines.get(full),
                                     "command line" if cli else None))

    def line(self, *path: str) -> int | None:
        return self.lines.get(("sweep", *path))

    def unknown_keys(self, path: tuple, values: dict, known: tuple) -> None:
        for key in values:
            if key not in known:
                suggestion = closest(str(key), known)
                hint = f"did you mean {suggestion}?" if suggestion else "use " + ", ".join(known)
                self.problem((*path, key), f"unknown key; {hint}")

    def read(self, section: Any, written: dict[str, Any], has_eval: bool) -> Sweep | None:
        if not isinstance(section, dict):
            self.problem((), "must be a mapping with objective, n_trials, sampler, pruner and parameters")
            return None
        self.unknown_keys((), section, SECTION_KEYS)
        command = section.get("command", "sft")
        if command not in COMMANDS:
            self.problem(("command",), f"must be one of {', '.join(COMMANDS)}, not {command!r}")
        metric, direction = self.read_objective(section.get("objective"))
        parameters, tied = self.read_parameters(section.get("parameters"), written)
        sampler, sampler_options = self.read_choice("sampler", section.get("sampler", "tpe"), SAMPLERS,
                                                    "optuna.samplers")
        # Pruning compares intermediate evaluations; without evaluation data there are none to compare.
        default_pruner = "median" if has_eval else "none"
        pruner, pruner_options = self.read_choice("pruner", section.get("pruner", default_pruner), PRUNERS,
                                                  "optuna.pruners")
        n_trials = self.read_n_trials(section.get("n_trials"), sampler, parameters)
        if self.problems:
            return None
        sweep = Sweep(command, metric, direction, n_trials, sampler, sampler_options, pruner, pruner_options,
                      parameters, tied, {key: self.line(key) for key in SECTION_KEYS})
        self.try_to_build(sweep)
        return None if self.problems else sweep

    def read_objective(self, values: Any) -> tuple[str, str]:
        if values is None:
            values = {}
        if isinstance(values, str):  # `objective: eval_loss`
            values = {"metric": values}
        if not isinstance(values, dict):
            self.problem(("objective",), "must be a mapping: {metric: eval_loss, direction: minimize}")
            return "", ""
        self.unknown_keys(("objective",), values, OBJECTIVE_KEYS)
        metric = values.get("metric", "eval_loss")
        if not isinstance(metric, str) or not metric:
            self.problem(("objective", "metric"), "must be the name of a metric the run reports, e.g. eval_loss")
            metric = ""
        direction = values.get("direction")
        if direction is None:
            if "loss" in metric or "perplexity" in metric:
                direction = "minimize"
            elif metric:
                self.problem(("objective", "direction"), f"required for {metric}: maximize or minimize")
        elif direction not in ("minimize", "maximize"):
            self.problem(("objective", "direction"), f"must be minimize or maximize, not {direction!r}")
        return metric, direction or ""

    def read_choice(self, name: str, value: Any, known: dict[str, str], module: str) -> tuple[str, dict]:
        """`sampler: tpe` or `sampler: {name: tpe, seed: 0}`: the options go to Optuna's class as they are."""
        options: dict = {}
        if isinstance(value, dict):
            options = {k: v for k, v in value.items() if k != "name"}
            value = value.get("name")
        if value not in known:
            self.problem((name,), f"must be one of {', '.join(known)}, not {value!r}")
            return "", {}
        cls = getattr(importlib.import_module(module), known[value])
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "search_space")]
        for key in options:
            if key not in accepted:
                suggestion = closest(str(key), accepted)
                hint = f"did you mean {suggestion}?" if suggestion else \
                    f"{module}.{known[value]} takes " + (", ".join(accepted) or "no options")
                self.problem((name, key), f"unknown option of {value}; {hint}")
        return value, options

    def try_to_build(self, sweep: Sweep) -> None:
        """Let Optuna itself refuse sampler or pruner options of the wrong type or range."""
        for name, make in (("sampler", sweep.make_sampler), ("pruner", sweep.make_pruner)):
            try:
                make()
            except (TypeError, ValueError) as error:
                self.problem((name,), f"Optuna refuses these options: {error}")

    def read_n_trials(self, value: Any, sampler: str, parameters: list[Parameter]) -> int:
        grid_size = None
        if sampler == "grid":
            unlisted = [p for p in parameters if p.type == "float" and p.step is None]
            for p in unlisted:
                self.problem(("parameters", p.key), "a grid needs the values to try: give step (low, low + step, "
                             "..., high) or use type: categorical")
            if unlisted or not parameters:
                return 0
            grid_size = math.prod(len(p.grid_values()) for p in parameters)
        if grid_size is not None and grid_size > MAX_GRID:
            self.problem(("parameters",), f"the grid has {grid_size:,} points (at most {MAX_GRID:,}); "
                         "sample it instead with sampler: tpe or random")
            return 0
        if value is None:
            if grid_size is not None:
                return grid_size  # the whole grid
            self.problem(("n_trials",), "required: how many trials to run (a grid runs every point by default)")
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.problem(("n_trials",), f"must be a positive integer, not {value!r}")
            return 0
        if grid_size is not None and value > grid_size:
            self.problem(("n_trials",), f"the grid has only {grid_size} points; set at most {grid_size}, "
                         "or leave n_trials out to run them all")
        return value

    # -- parameters
    def read_parameters(self, values: Any, written: dict[str, Any]) -> tuple[list[Parameter], list[Parameter]]:
        if not isinstance(values, dict) or not values:
            self.problem(("parameters",), "required: a mapping of dotted recipe keys to search, e.g. "
                         "training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}")
            return [], []
        sampled, tied = [], []
        for key, spec in values.items():
            key = str(key)
            reason = next((why for prefix, why in NOT_SEARCHABLE.items()
                           if key == prefix or key.startswith(prefix + ".")), None)
            if key.startswith("sweep.") or key == "sweep":
                reason = "the sweep section itself cannot be searched"
            if reason:
                self.problem(("parameters", key), f"cannot be searched: {reason}")
                continue
            parameter = self.read_parameter(key, spec)
            if parameter is not None:
                (tied if parameter.type == "expr" else sampled).append(parameter)
        return sampled, self.order_expressions(tied, {p.key for p in sampled}, written)

    def read_parameter(self, key: str, spec: Any) -> Parameter | None:
        path = ("parameters", key)
        line = self.line(*path)
        if not isinstance(spec, dict):
            self.problem(path, "must be a mapping: {type: float, low: ..., high: ...}, "
                         "{type: categorical, choices: [...]} or {expr: \"...\"}")
            return None
        self.unknown_keys(path, spec, PARAMETER_KEYS)
        if "expr" in spec:
            extra = sorted(k for k in spec if k != "expr" and k in PARAMETER_KEYS)
            if extra:
                self.problem(path, f"an expr parameter takes no {', '.join(extra)}: its value is computed")
            try:
                expressions.names(spec["expr"])
            except expressions.ExpressionError as error:
                self.problem((*path, "expr"), str(error))
                return None
            return Parameter(key, line, "expr", expr=spec["expr"].strip())
        kind = spec.get("type")
        if kind not in TYPES:
            suggestion = closest(str(kind), TYPES) if kind is not None else None
            hint = f"; did you mean {suggestion}?" if suggestion else ""
            self.problem((*path, "type"), f"must be one of {', '.join(TYPES)} (or give expr instead){hint}"
                         if kind is not None else f"required: one of {', '.join(TYPES)}, or an expr")
            return None
        if kind == "categorical":
            return self.read_categorical(key, spec, line)
        return self.read_range(key, kind, spec, line)

    def read_categorical(self, key: str, spec: dict, line: int | None) -> Parameter | None:
        path = ("parameters", key)
        for stray in ("low", "high", "log", "step"):
            if stray in spec:
                self.problem((*path, stray), "a categorical parameter takes choices only")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            self.problem((*path, "choices"), "required: a non-empty list of values")
            return None
        texts = [json.dumps(c, sort_keys=True) for c in choices]
        repeated = sorted({t for t in texts if texts.count(t) > 1})
        if repeated:
            self.problem((*path, "choices"), f"lists {', '.join(repeated)} more than once")
            return None
        return Parameter(key, line, "categorical", choices=list(choices))

    def read_range(self, key: str, kind: str, spec: dict, line: int | None) -> Parameter | None:
        path = ("parameters", key)
        if "choices" in spec:
            self.problem((*path, "choices"), f"belongs to type: categorical; a {kind} range takes low and high")
        number = int if kind == "int" else (int, float)
        bounds = {}
        for end in ("low", "high"):
            value = spec.get(end)
            if value is None:
                self.problem((*path, end), f"required for type: {kind}")
            elif isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
                self.problem((*path, end), f"must be {'an integer' if kind == 'int' else 'a number'}, not {value!r}")
            else:
                bounds[end] = value
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            self.problem((*path, "log"), f"must be true or false, not {log!r}")
            return None
        if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
            self.problem((*path, "step"), f"must be a positive {'integer' if kind == 'int' else 'number'}")
            return None
        if len(bounds) < 2:
            return None
        low, high = bounds["low"], bounds["high"]
        if kind == "float":
            low, high = float(low), float(high)
        if low > high:
            self.problem((*path, "low"), f"low ({low}) is above high ({high})")
            return None
        if log and low <= 0:
            self.problem((*path, "low"), f"must be above 0 with log: true (a log scale has no {low})")
            return None
        if log and step is not None and not (kind == "int" and step == 1):
            self.problem((*path, "step"), "cannot be combined with log: true (Optuna samples one or the other)")
            return None
        if step is not None:
            count = (high - low) / step
            if abs(count - round(count)) > 1e-9 * max(1.0, abs(count)):
                self.problem((*path, "step"), f"high ({high}) is not low ({low}) plus a whole number of steps of "
                             f"{step}")
                return None
        return Parameter(key, line, kind, low=low, high=high, log=log, step=float(step) if kind == "float" and
                         step is not None else step)

    def order_expressions(self, tied: list[Parameter], sampled: set[str], written: dict[str, Any]) -> list[Parameter]:
        """Expressions ordered so each comes after those it reads; a name nobody provides, or a cycle, is a
        problem."""
        by_key = {p.key: p for p in tied}
        ordered: list[Parameter] = []
        remaining = list(tied)
        while remaining:
            ready = [p for p in remaining
                     if all(n in sampled or n in written or n in {o.key for o in ordered}
                            for n in expressions.names(p.expr))]
            if not ready:
                for p in remaining:
                    missing = [n for n in expressions.names(p.expr)
                               if n not in sampled and n not in written and n not in by_key]
                    if missing:
                        self.problem(("parameters", p.key, "expr"), f"reads {', '.join(missing)}, which is neither "
                                     "searched nor set in the recipe")
                    else:
                        self.problem(("parameters", p.key, "expr"), "depends on itself through other expressions")
                return ordered
            ordered += ready
            remaining = [p for p in remaining if p not in ready]
        return ordered
