"""The `sweep:` section of a recipe: which command, which objective, how many trials, Optuna's sampler and pruner,
and the search space, each parameter a dotted recipe key.

```yaml
sweep:
  objective: {metric: eval_loss, direction: minimize}
  n_trials: 20
  sampler: tpe                      # tpe | random | grid, or {name: tpe, seed: 0, n_startup_trials: 5}
  pruner: median                    # none | median | hyperband, or {name: median, n_startup_trials: 2}
  parameters:
    training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    lora.r: {type: categorical, choices: [8, 16, 32]}
    lora.lora_alpha: {expr: "2 * lora.r"}
```

section.py reads and checks the section into a `Sweep`; recipes.py checks the recipes its space can produce.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lorakit.sweep import expressions

COMMANDS = ("sft", "classify", "dpo")
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}  # optuna.samplers.*
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "hyperband": "HyperbandPruner"}  # optuna.pruners.*


@dataclass
class Parameter:
    """One searched recipe key: sampled (float, int, categorical) or computed from others (expr)."""

    key: str
    line: int | None
    type: str  # float | int | categorical | expr
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: list = field(default_factory=list)
    expr: str | None = None

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return from_optuna(trial.suggest_categorical(self.key, [as_optuna(choice) for choice in self.choices]))

    def extremes(self) -> list:
        """The values that bound what the sampler can choose: both ends of a range, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        return [self.low] if self.low == self.high else [self.low, self.high]

    def grid_values(self) -> list:
        if self.type == "categorical":
            return list(self.choices)
        step = self.step or 1
        count = int(round((self.high - self.low) / step)) + 1
        values = [self.low + index * step for index in range(count)]
        # 0.1 + 2 * 0.1 is 0.30000000000000004: keep the digits a person wrote
        return [float(f"{value:.12g}") for value in values] if self.type == "float" else values


def as_optuna(choice: Any) -> Any:
    """Optuna keeps only scalars in a categorical; a list or mapping choice (target_modules: [q_proj, v_proj])
    is kept as its JSON text and read back by `from_optuna`."""
    return choice if choice is None or isinstance(choice, (bool, int, float, str)) else "json:" + json.dumps(choice)


def from_optuna(value: Any) -> Any:
    return json.loads(value[5:]) if isinstance(value, str) and value.startswith("json:") else value


@dataclass
class Sweep:
    """A checked `sweep:` section."""

    command: str
    metric: str
    direction: str  # minimize | maximize
    n_trials: int
    sampler: str
    sampler_options: dict
    pruner: str
    pruner_options: dict
    parameters: list[Parameter]  # sampled, in the order written
    expressions: list[Parameter]  # computed, each after the values it reads
    lines: dict[str, int | None] = field(default_factory=dict)  # section key -> line, for later problems

    def fingerprint(self) -> str:
        """What makes two runs the same study: the command, the objective and the space (not the trial count,
        sampler or pruner, which a resumed study may change)."""
        space = [[p.key, p.type, p.low, p.high, p.log, p.step, p.choices, p.expr]
                 for p in self.parameters + self.expressions]
        text = json.dumps([self.command, self.metric, self.direction, space], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def grid(self) -> dict[str, list]:
        return {p.key: [as_optuna(v) for v in p.grid_values()] for p in self.parameters}

    def make_sampler(self) -> Any:
        import optuna

        options = dict(self.sampler_options)
        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.grid(), **options)
        return getattr(optuna.samplers, SAMPLERS[self.sampler])(**options)

    def make_pruner(self) -> Any:
        import optuna

        return getattr(optuna.pruners, PRUNERS[self.pruner])(**self.pruner_options)

    def suggest(self, trial, written: dict[str, Any]) -> dict[str, Any]:
        """Every searched key's value for this trial: sampled ones from Optuna, then the expressions
        (which may also read values written in the recipe, `written`)."""
        values = {p.key: p.suggest(trial) for p in self.parameters}
        return self.with_expressions(values, written)

    def with_expressions(self, values: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        for p in self.expressions:
            try:
                values[p.key] = expressions.evaluate(p.expr, {**written, **values})
            except expressions.ExpressionError as error:
                error.key = p.key  # type: ignore[attr-defined]
                raise
        return values
