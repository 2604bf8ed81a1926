"""Checking a recipe's sections: types, impossible values, missing files, conflicting options.

Every problem is collected (not raised one at a time), each with its YAML path and line, and raised together
as one RecipeError at the end.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from lorakit.errors import Problem, RecipeError
from lorakit.recipe.sections import (
    LORA_DEFAULTS,
    QUANTIZATION_4BIT_DEFAULTS,
    SHIPPED_CHAT_TEMPLATES,
    LOCAL_DATA_EXTENSIONS,
    COMMAND_SECTIONS,
    COMMAND_TRAINING_DEFAULTS,
    TOP_LEVEL,
    TRAINING_DEFAULTS,
    TRAINING_KEYS_OWNED_ELSEWHERE,
    DataSection,
    DataSource,
    EarlyStoppingSection,
    LaunchSection,
    ModelSection,
    Recipe,
    looks_like_path,
    own_fields,
    upstream_fields,
)
from lorakit.recipe.schema import Invalid, closest, coerce
from lorakit.recipe.task_checks import check_task

# training.report_to: the module each logging integration imports, and the package that provides it.
REPORT_TO_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "clearml": ("clearml", "clearml"),
    "neptune": ("neptune", "neptune"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "codecarbon": ("codecarbon", "codecarbon"),
}

# Outside this range a LoRA run is almost always a typo or a dead run (training.learning_rate 1e8 saturates a
# model at the first step); a warning, since research recipes can have their reasons. DPO starts from a tuned
# model and is run 10-100x lower (alignment-handbook's QLoRA DPO recipes: 5e-6).
SANE_LEARNING_RATES = {"sft": (1e-5, 1e-2), "classify": (1e-5, 1e-2), "dpo": (1e-7, 1e-3)}


class Validator:
    def __init__(self, file: Path | None, lines: Any, overridden: set[tuple], check_paths: bool, command: str = "sft"):
        self.file = file  # None for a recipe given as a dict (the Python API): paths resolve from the working dir
        self.command = command
        self.own_sections = COMMAND_SECTIONS[command]
        self.lines = lines
        self.overridden = overridden
        self.check_paths = check_paths
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []  # allowed, but most likely not what was meant; shown, never fatal

    def problem(self, path: tuple, message: str) -> None:
        self.problems.append(self.at(path, message))

    def warning(self, path: tuple, message: str) -> None:
        self.warnings.append(self.at(path, message))

    def at(self, path: tuple, message: str) -> Problem:
        dotted = ".".join(str(p) for p in path)
        from_cli = any(path[: len(o)] == o for o in self.overridden)
        return Problem(dotted, message, self.lines.get(path), "command line" if from_cli else None)

    # -- generic checking of one mapping against {key: (annotation, default)}
    def check_mapping(self, path: tuple, values: Any, fields: dict[str, tuple[Any, Any]],
                      extra_hint: dict[str, str] | None = None) -> dict[str, Any]:
        if values is None:
            values = {}
        if not isinstance(values, dict):
            self.problem(path, f"must be a mapping of keys, not {type(values).__name__}")
            return {}
        out = {}
        for key, value in values.items():
            if extra_hint and key in extra_hint:
                self.problem(path + (key,), f"set by lorakit from {extra_hint[key]}; set that instead")
                continue
            if key not in fields:
                suggestion = closest(str(key), fields)
                hint = f"; did you mean {'.'.join(map(str, path))}.{suggestion}?" if suggestion else ""
                self.problem(path + (key,), f"unknown key{hint}")
                continue
            annotation, _ = fields[key]
            try:
                out[key] = coerce(value, annotation)
            except Invalid as error:
                self.problem(path + (key,), str(error))
        return out

    def fill_defaults(self, path: tuple, values: dict, fields: dict[str, tuple[Any, Any]]) -> dict:
        out = {}
        for key, (_, default) in fields.items():
            if key in values:
                out[key] = values[key]
            elif default is dataclasses.MISSING:
                self.problem(path + (key,), "required")
            else:
                out[key] = copy.deepcopy(default)
        return out

    # -- sections
    def validate(self, data: dict) -> Recipe:
        known = TOP_LEVEL + tuple(self.own_sections)
        for key in data:
            if key == "sweep":  # lorakit sweep's section (lorakit/sweep/); a training command trains one recipe
                self.problem((key,), "is read by `lorakit sweep`, which trains this recipe once per trial with "
                             "the values it searches; run `lorakit sweep` on this file, or remove the section to "
                             "train it once as written")
            elif key not in known:
                suggestion = closest(str(key), known)
                hint = f"; did you mean {suggestion}?" if suggestion else f"; sections are {', '.join(known)}"
                self.problem((key,), f"unknown section{hint}")
        model = self.validate_model(data.get("model"))
        lora = self.validate_lora(data.get("lora"))
        quantization = self.validate_quantization(data.get("quantization")) if data.get("quantization") else None
        dataset = self.validate_data(data.get("data"))
        training = self.validate_training(data.get("training"))
        early = None
        if data.get("early_stopping") is not None:
            fields = own_fields(EarlyStoppingSection)
            early = self.fill_defaults(("early_stopping",), self.check_mapping(
                ("early_stopping",), data["early_stopping"], fields), fields)
            if early.get("patience", 1) < 1:
                self.problem(("early_stopping", "patience"), "must be at least 1")
            if dataset and not (dataset.get("eval") or dataset.get("eval_fraction")):
                self.problem(("early_stopping",), "needs evaluation data: set data.eval or data.eval_fraction")
        launch = self.validate_launch(data.get("launch"), quantization)
        self.check_report_to(training.get("report_to"))
        sections = {}
        for name, section in self.own_sections.items():
            fields = own_fields(section)
            sections[name] = self.fill_defaults((name,), self.check_mapping((name,), data.get(name), fields), fields)
        self.check_conflicts(training, quantization, model)
        self.check_evaluation(training, dataset)
        if self.command == "classify":
            check_task(data, sections["task"], lora, training, self.problem)  # classify's own section
        if self.command == "dpo":  # its start point (a run folder), reference and pair data
            from lorakit.models.start_point import check_dpo_recipe

            lora = check_dpo_recipe(self, data, model, lora, dataset, sections)
        if self.problems:
            raise RecipeError(self.file, self.problems)
        return Recipe(model=model, data=dataset, lora=lora, training=training, quantization=quantization,
                      early_stopping=early, launch=launch, file=self.file.resolve() if self.file else None,
                      command=self.command,
                      sections=sections, warnings=self.warnings)

    def validate_launch(self, values: Any, quantization: dict | None) -> dict:
        fields = own_fields(LaunchSection)
        launch = self.fill_defaults(("launch",), self.check_mapping(("launch",), values, fields), fields)
        if isinstance(launch.get("num_processes"), int) and launch["num_processes"] < 1:
            self.problem(("launch", "num_processes"), "must be at least 1")
        config = launch.get("accelerate_config")
        if isinstance(config, str):
            path = self.local_path(("launch", "accelerate_config"), config)
            if path is None or not path.is_file():
                self.problem(("launch", "accelerate_config"), f"file not found: {config} (shipped configs are "
                             "in recipes/accelerate/); looked for "
                             f"{self.looked_for(('launch', 'accelerate_config'), config)}"
                             + self.relative_note(config))
                return launch
            launch["accelerate_config"] = str(path)
            from lorakit.training.launch import incompatibility

            message = incompatibility(path, quantization)
            if message:
                self.problem(("launch", "accelerate_config"), message)
        return launch

    def validate_model(self, values: Any) -> dict:
        if values is None:
            self.problem(("model",), "required: at least model.name_or_path")
            return {}
        if isinstance(values, str):  # `model: owner/name` shorthand
            values = {"name_or_path": values}
        fields = own_fields(ModelSection)
        model = self.fill_defaults(("model",), self.check_mapping(("model",), values, fields), fields)
        name = model.get("name_or_path")
        if isinstance(name, str) and self.check_paths:
            local = self.local_path(("model", "name_or_path"), name)
            if local is not None:
                model["name_or_path"] = str(local)
                run_folder = self.command == "dpo" and (local / "adapter_config.json").is_file()  # runs/my-sft
                if not (local / "config.json").exists() and not run_folder:
                    self.problem(("model", "name_or_path"), f"{local} is a folder but holds no config.json, "
                                 "so it is not a Hugging Face model folder")
            elif looks_like_path(name):
                self.problem(("model", "name_or_path"), f"no such folder: {name} (nor a Hub id of the form "
                             f"owner/name); looked for {self.looked_for(('model', 'name_or_path'), name)}"
                             + self.relative_note(name))
        template = model.get("chat_template")
        if isinstance(template, str) and "{" not in template and template not in SHIPPED_CHAT_TEMPLATES:
            path = self.local_path(("model", "chat_template"), template)
            if path is not None and path.is_file():
                model["chat_template"] = str(path)
            else:
                self.problem(("model", "chat_template"), f"no such template file or shipped template: {template!r}; "
                             f"use {', '.join(SHIPPED_CHAT_TEMPLATES)}, a path to a .jinja file or a Jinja string")
        if model.get("trust_remote_code") and not model.get("revision"):
            # Not an error: documented in the run summary. Remote code can change under a moving branch.
            pass
        return model

    def validate_lora(self, values: Any) -> dict:
        fields = upstream_fields("lora")
        lora = {**LORA_DEFAULTS, **self.check_mapping(("lora",), values, fields)}
        if isinstance(lora.get("r"), int) and lora["r"] <= 0:
            self.problem(("lora", "r"), "must be a positive integer (typical: 8-64)")
        if isinstance(lora.get("lora_alpha"), (int, float)) and lora["lora_alpha"] <= 0:
            self.problem(("lora", "lora_alpha"), "must be positive (typical: 2 x r)")
        dropout = lora.get("lora_dropout")
        if isinstance(dropout, float) and not 0 <= dropout < 1:
            self.problem(("lora", "lora_dropout"), "must be in [0, 1)")
        return lora

    def validate_quantization(self, values: Any) -> dict:
        fields = upstream_fields("quantization")
        quant = self.check_mapping(("quantization",), values, fields)
        four, eight = quant.get("load_in_4bit"), quant.get("load_in_8bit")
        if four and eight:
            self.problem(("quantization", "load_in_8bit"), "conflicts with quantization.load_in_4bit: choose one "
                         "(4-bit NF4 for QLoRA, or 8-bit)")
        elif not four and not eight and isinstance(values, dict):
            self.problem(("quantization",), "set load_in_4bit: true (QLoRA) or load_in_8bit: true, "
                         "or remove the section for plain LoRA")
        if four and not eight:
            quant = {**QUANTIZATION_4BIT_DEFAULTS, **quant}
            if quant.get("bnb_4bit_quant_type") not in ("nf4", "fp4"):
                self.problem(("quantization", "bnb_4bit_quant_type"), "must be nf4 or fp4")
        if eight and not four:
            stray = sorted(k for k in quant if k.startswith("bnb_4bit_"))
            for key in stray:
                self.problem(("quantization", key), "only applies with load_in_4bit")
        return quant

    def validate_data(self, values: Any) -> dict:
        if values is None:
            self.problem(("data",), "required: at least data.train")
            return {}
        if not isinstance(values, dict):
            self.problem(("data",), "must be a mapping with train (and optionally eval, max_length, ...)")
            return {}
        fields = own_fields(DataSection)
        plain = {k: v for k, v in values.items() if k not in ("train", "eval")}
        data = self.check_mapping(("data",), plain, {k: v for k, v in fields.items() if k not in ("train", "eval")})
        if "train" not in values:
            self.problem(("data", "train"), "required: a list of sources, each with a path")
        data["train"] = self.validate_sources(("data", "train"), values.get("train"))
        data["eval"] = self.validate_sources(("data", "eval"), values.get("eval")) if values.get("eval") else None
        data = self.fill_defaults(("data",), data, fields)
        if data.get("eval") and data.get("eval_fraction"):
            self.problem(("data", "eval_fraction"), "conflicts with data.eval: give eval sources or a fraction, not both")
        fraction = data.get("eval_fraction")
        if isinstance(fraction, float) and not 0 < fraction < 1:
            self.problem(("data", "eval_fraction"), "must be between 0 and 1 (e.g. 0.05)")
        if isinstance(data.get("max_length"), int) and data["max_length"] < 8:
            self.problem(("data", "max_length"), "must be at least 8 tokens")
        return data

    def validate_sources(self, path: tuple, values: Any) -> list[dict]:
        if values is None:
            return []
        if isinstance(values, (str, dict)):
            values = [values]
        if not isinstance(values, list) or not values:
            self.problem(path, "must be a list of sources, each with a path")
            return []
        fields = own_fields(DataSource)
        sources = []
        for index, source in enumerate(values):
            where = path + (index,)
            if isinstance(source, str):
                source = {"path": source}
            source = self.fill_defaults(where, self.check_mapping(where, source, fields), fields)
            name = source.get("path")
            if isinstance(name, str) and self.check_paths:
                local = self.local_path(where + ("path",), name)
                if local is not None:
                    source["path"] = str(local)
                    if local.is_file() and local.suffix.lower() not in LOCAL_DATA_EXTENSIONS:
                        self.problem(where + ("path",), f"{local.name}: unsupported file type; use one of "
                                     + ", ".join(LOCAL_DATA_EXTENSIONS))
                elif looks_like_path(name):
                    self.problem(where + ("path",), f"file not found: {name}; looked for "
                                 f"{self.looked_for(where + ('path',), name)}" + self.relative_note(name))
            if source.get("fraction") is not None and source.get("weight") is not None:
                self.problem(where + ("weight",), "conflicts with fraction: use one")
            fraction = source.get("fraction")
            if isinstance(fraction, float) and not 0 < fraction <= 1:
                self.problem(where + ("fraction",), "must be in (0, 1]")
            weight = source.get("weight")
            if isinstance(weight, float) and weight <= 0:
                self.problem(where + ("weight",), "must be positive")
            sources.append(source)
        return sources

    def validate_training(self, values: Any) -> dict:
        fields = upstream_fields("training", self.command)
        given = self.check_mapping(("training",), values, fields, extra_hint=TRAINING_KEYS_OWNED_ELSEWHERE)
        training = {**TRAINING_DEFAULTS, **COMMAND_TRAINING_DEFAULTS.get(self.command, {}), **given}
        if not training.get("output_dir"):
            training["output_dir"] = str(Path("runs") / (self.file.stem if self.file else self.command))
        training["output_dir"] = str(Path(training["output_dir"]).expanduser().absolute())
        positive = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
        for key in positive:
            value = training.get(key)
            if isinstance(value, (int, float)) and value <= 0:
                self.problem(("training", key), "must be positive")
        if training.get("bf16") and training.get("fp16"):
            self.problem(("training", "fp16"), "conflicts with training.bf16: choose one")
        max_steps = training.get("max_steps", -1)
        if isinstance(max_steps, int) and max_steps < 1 and max_steps != -1:
            # transformers reads any value below 1 as "not set" and trains whole epochs instead
            self.problem(("training", "max_steps"), f"must be at least 1, or -1 to train "
                         f"training.num_train_epochs epochs instead; not {max_steps}")
        rate = training.get("learning_rate")
        low, high = SANE_LEARNING_RATES.get(self.command, SANE_LEARNING_RATES["sft"])
        if isinstance(rate, float) and rate > 0 and not low <= rate <= high:
            self.warning(("training", "learning_rate"), f"{rate:g} is outside {low:g} to {high:g}, where LoRA "
                         "learning rates usually are (2e-4 is a common start); "
                         + ("too high a rate saturates the model in a step or two and the run learns nothing"
                            if rate > high else "too low a rate barely moves the adapter"))
        epochs = training.get("num_train_epochs")
        if isinstance(epochs, (int, float)) and epochs <= 0 and not (isinstance(max_steps, int) and max_steps > 0):
            self.problem(("training", "num_train_epochs"), "must be positive (or set training.max_steps)")
        warmup = training.get("warmup_steps")
        if isinstance(warmup, (int, float)) and warmup < 0:
            self.problem(("training", "warmup_steps"), "must be >= 0 (a float below 1 is a ratio of total steps)")
        return training

    def check_evaluation(self, training: dict, dataset: dict) -> None:
        strategy = training.get("eval_strategy")
        if strategy not in (None, "no") and dataset and not (dataset.get("eval") or dataset.get("eval_fraction")):
            self.problem(("training", "eval_strategy"), f"{strategy} evaluates during training, but the recipe has "
                         "no evaluation data: set data.eval (or data.eval_fraction), or remove "
                         "training.eval_strategy")

    def check_conflicts(self, training: dict, quantization: dict | None, model: dict) -> None:
        if quantization and training.get("fp16") and model.get("dtype") == "bfloat16":
            self.problem(("training", "fp16"), "conflicts with model.dtype: bfloat16")
        if training.get("use_cpu") and model.get("device") not in ("auto", "cpu"):
            self.problem(("training", "use_cpu"), f"conflicts with model.device: {model.get('device')}")

    def check_report_to(self, value: Any) -> None:
        """Each logging integration in training.report_to must be one transformers knows, and installed: found
        now, not in a traceback after the model has loaded."""
        import importlib.util

        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for name in names:
            if name in ("none", "all"):
                continue
            if name not in INTEGRATION_TO_CALLBACK:
                suggestion = closest(str(name), INTEGRATION_TO_CALLBACK)
                hint = f"; did you mean {suggestion}?" if suggestion else ""
                self.problem(("training", "report_to"), f"{name!r} is not a logging integration of transformers "
                             f"({', '.join(INTEGRATION_TO_CALLBACK)}, or none){hint}")
                continue
            module, package = REPORT_TO_PACKAGES.get(name, (None, None))
            if module is not None and importlib.util.find_spec(module) is None:
                self.problem(("training", "report_to"), f"{name} needs the {package} package, which is not "
                             f"installed: pip install {package}")

    # -- paths
    def base_dir(self, path: tuple) -> Path:
        """What a relative path at `path` is relative to: the recipe file's folder (as docker-compose resolves a
        compose file's paths), so a recipe means the same from any working directory. A value given on the
        command line, or a recipe with no file (a dict given to the Python API), is relative to the working
        directory instead, as the shell's own paths are."""
        from_cli = any(path[: len(o)] == o for o in self.overridden)
        return Path.cwd() if from_cli or self.file is None else self.file.resolve().parent

    def looked_for(self, path: tuple, name: str) -> Path:
        expanded = Path(name).expanduser()
        return expanded if expanded.is_absolute() else self.base_dir(path) / expanded

    def relative_note(self, name: str) -> str:
        if Path(name).expanduser().is_absolute() or self.file is None:
            return ""
        return " (a relative path in a recipe is relative to the recipe file's folder)"

    def local_path(self, path: tuple, name: str) -> Path | None:
        """The local file or folder that `name` (at YAML path `path`) names, or None (it may be a Hub id)."""
        candidate = self.looked_for(path, name)
        return candidate.resolve() if candidate.exists() else None
