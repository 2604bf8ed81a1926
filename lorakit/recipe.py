"""The recipe: load YAML, apply command-line overrides, validate, resolve defaults, dump.

A recipe has lorakit's own sections (`model`, `data`, `early_stopping`) and
sections that belong to upstream libraries (`quantization` ->
transformers.BitsAndBytesConfig, `lora` -> peft.LoraConfig, `training` ->
trl.SFTConfig). Upstream sections keep upstream key names and are checked
against the upstream classes' own fields, so every upstream option works
without lorakit naming it.

Everything is checked before any model or data is loaded, and every problem
is reported at once as `section.key (line N): what is wrong`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.schema import Invalid, closest, coerce

SHIPPED_CHAT_TEMPLATES = ("chatml",)
LOCAL_DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
FORMATS = ("text", "alpaca", "sharegpt", "messages", "prompt_completion")
# Credentials only: `hub_token`, `api_key`, `password`...; not trl's `eos_token` / `pad_token` nor token counts.
SECRET_KEY_PATTERN = re.compile(r"(^|_)(token|secret|password|passwd|api_key|access_key)$", re.IGNORECASE)
NOT_SECRET_KEYS = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask)_token$")


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose help text lives next to it (docs/recipe-reference.md is built from these)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text}, **kwargs)


# ---------------------------------------------------------------- lorakit's own sections


@dataclass
class ModelSection:
    name_or_path: str = doc("Hub id (owner/name) or local folder of the base model.")
    revision: str | None = doc("Hub branch, tag or commit to load; pin it for reproducible runs.", None)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = doc(
        "Weights and compute dtype. auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU.",
        "auto",
    )
    attn_implementation: str = doc(
        "auto: flash_attention_2 when installed and on CUDA, else sdpa. Or any transformers value (eager, sdpa, ...).",
        "auto",
    )
    trust_remote_code: bool = doc("Run modelling code from the model repository. Only for repositories you trust.", False)
    chat_template: str | None = doc(
        "null: the tokenizer's own (chatml when it has none). Or a name lorakit ships (chatml), "
        "a path to a .jinja file, or a Jinja string.",
        None,
    )
    device: Literal["auto", "cuda", "xla", "mps", "xpu", "cpu"] = doc(
        "auto: CUDA, else TPU (xla), else XPU, else Apple MPS, else CPU. Same as `lorakit sft --device`.", "auto"
    )


@dataclass
class DataSource:
    path: str = doc("Hub dataset id, or a local file or folder (json, jsonl, csv, parquet, arrow, txt).")
    name: str | None = doc("Dataset configuration name (Hub datasets with several configs).", None)
    split: str = doc("Split to read.", "train")
    revision: str | None = doc("Hub branch, tag or commit of the dataset.", None)
    format: Literal["text", "alpaca", "sharegpt", "messages", "prompt_completion"] | None = doc(
        "Row format; detected from the columns when omitted.", None
    )
    columns: dict[str, str] = doc("Rename source columns to the format's names: {format_name: source_name}.", {})
    fraction: float | None = doc("Use this fraction (0-1] of the source's rows, sampled with the seed.", None)
    weight: float | None = doc(
        "Repeat factor for mixing: 2 uses every row twice, 0.5 a seeded half. Exclusive with fraction.", None
    )


@dataclass
class DataSection:
    train: list[DataSource] = doc("Training sources (a list; a single path is accepted too).")
    eval: list[DataSource] | None = doc("Evaluation sources, in the same form as train.", None)
    eval_fraction: float | None = doc("Hold out this fraction of the training rows for evaluation (seeded).", None)
    max_length: int = doc("Longest sequence in tokens, after the chat template.", 2048)
    truncation: Literal["truncate", "drop", "error"] = doc(
        "What to do with a row longer than max_length: cut it, leave it out (counted), or stop with its row number.",
        "truncate",
    )
    train_on: Literal["completions", "all"] = doc(
        "completions: loss on assistant turns / completions only, their end-of-turn token included. all: every token.",
        "completions",
    )


@dataclass
class EarlyStoppingSection:
    patience: int = doc("Evaluations without improvement of eval loss before training stops.", 3)
    threshold: float = doc("Smallest eval-loss improvement that counts.", 0.0)


@dataclass
class LaunchSection:
    accelerate_config: str | None = doc(
        "accelerate config file (DDP, FSDP, DeepSpeed; see recipes/accelerate/). Same as `lorakit sft --accelerate-config`.",
        None,
    )
    num_processes: int | None = doc(
        "Processes to launch (usually one per GPU). Same as `lorakit sft --num-processes`; null: the config's or 1.",
        None,
    )


OWN_SECTIONS = {"model": ModelSection, "data": DataSection, "early_stopping": EarlyStoppingSection,
                "launch": LaunchSection}
UPSTREAM_SECTIONS = {
    "quantization": "transformers.BitsAndBytesConfig",
    "lora": "peft.LoraConfig",
    "training": "trl.SFTConfig",
}
TOP_LEVEL = ("model", "quantization", "lora", "data", "training", "early_stopping", "launch")

# lorakit's defaults for upstream sections, where upstream's are not fit for LoRA (each says why).
LORA_DEFAULTS = {
    "r": 16,
    "lora_alpha": 32,  # alpha = 2r, the usual LoRA scaling
    "lora_dropout": 0.05,
    "target_modules": "all-linear",  # adapting every linear layer beats attention-only (QLoRA paper)
    "task_type": "CAUSAL_LM",
}
TRAINING_DEFAULTS = {
    "learning_rate": 2.0e-4,  # trl's 2e-5 is a full fine-tuning rate; LoRA needs ~10x more
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a ratio of the total steps
    "num_train_epochs": 1,
    "logging_steps": 10,
    "report_to": "none",
    "save_total_limit": 2,  # checkpoints are for resuming; two bound the disk a long run takes
}
QUANTIZATION_4BIT_DEFAULTS = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}

# trl fields that lorakit sets from its own keys; setting both would be ambiguous.
TRAINING_KEYS_OWNED_ELSEWHERE = {
    "max_length": "data.max_length",
    "assistant_only_loss": "data.train_on",
    "completion_only_loss": "data.train_on",
    "dataset_text_field": "data.train (lorakit maps every format itself)",
    "chat_template_path": "model.chat_template",
}


# ---------------------------------------------------------------- errors


@dataclass
class Problem:
    path: str
    message: str
    line: int | None = None
    source: str | None = None  # "command line" for overrides

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else (f" (line {self.line})" if self.line else "")
        return f"{self.path}{where}: {self.message}"


class RecipeError(Exception):
    """Every problem in a recipe, one per line."""

    def __init__(self, file: str | os.PathLike | None, problems: list[Problem]):
        self.file = str(file) if file else None
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.file}: " if self.file else ""
        count = len(self.problems)
        lines = [f"{head}{count} problem{'s' if count != 1 else ''} in the recipe:"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """A validated recipe. Upstream sections stay plain dicts in upstream's own key names."""

    model: dict[str, Any]
    data: dict[str, Any]
    lora: dict[str, Any]
    training: dict[str, Any]
    quantization: dict[str, Any] | None = None
    early_stopping: dict[str, Any] | None = None
    launch: dict[str, Any] | None = None
    file: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model}
        if self.quantization:
            out["quantization"] = self.quantization
        out["lora"] = self.lora
        out["data"] = self.data
        out["training"] = self.training
        if self.early_stopping:
            out["early_stopping"] = self.early_stopping
        if self.launch and any(v is not None for v in self.launch.values()):
            out["launch"] = self.launch
        return copy.deepcopy(out)

    def dump(self) -> str:
        """The resolved recipe as YAML, re-runnable as is, with secrets removed."""
        header = "# lorakit sft lorakit_recipe.yaml\n# The resolved recipe of this run: every default filled in, local paths absolute.\n"
        return header + yaml.safe_dump(redact(self.to_dict()), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """Hash of everything that decides the trained weights (not where they are written, nor logging)."""
        data = self.to_dict()
        for key in ("output_dir", "logging_dir", "logging_steps", "report_to", "run_name", "overwrite_output_dir",
                    "push_to_hub", "hub_model_id", "hub_token", "disable_tqdm", "save_total_limit"):
            data["training"].pop(key, None)
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    @property
    def has_eval(self) -> bool:
        return bool(self.data.get("eval")) or bool(self.data.get("eval_fraction"))


def is_secret_key(key: Any) -> bool:
    key = str(key)
    return bool(SECRET_KEY_PATTERN.search(key)) and not NOT_SECRET_KEYS.match(key)


def redact(value: Any) -> Any:
    """A copy with every secret-looking key's value replaced, so a token never reaches a file or log."""
    if isinstance(value, dict):
        return {
            k: ("<redacted>" if is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


# ---------------------------------------------------------------- loading


class _LineMap:
    """Maps a dotted key path to the line of the YAML file where it was written."""

    def __init__(self, node: yaml.Node | None):
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                self._walk(value_node, child)
                self.lines[child] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, path + (index,))

    def get(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def read_yaml(file: Path) -> tuple[dict, _LineMap]:
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
    return data, _LineMap(node)


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


def load_recipe(file: str | os.PathLike, overrides: typing.Sequence[str] = (), check_paths: bool = True) -> Recipe:
    """Read, override, validate and resolve a recipe; raise RecipeError listing every problem."""
    file = Path(file)
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
    return Validator(file, lines, overridden, check_paths).validate(data)


# ---------------------------------------------------------------- validation


def upstream_fields(section: str) -> dict[str, tuple[Any, Any]]:
    """{key: (annotation, default)} of the upstream class behind a section."""
    if section == "training":
        from trl import SFTConfig

        hints = typing.get_type_hints(SFTConfig)
        return {f.name: (hints.get(f.name, Any), _field_default(f)) for f in dataclasses.fields(SFTConfig) if f.init}
    if section == "lora":
        from peft import LoraConfig

        hints = typing.get_type_hints(LoraConfig)
        return {f.name: (hints.get(f.name, Any), _field_default(f)) for f in dataclasses.fields(LoraConfig) if f.init}
    if section == "quantization":
        from transformers import BitsAndBytesConfig

        params = inspect.signature(BitsAndBytesConfig.__init__).parameters
        out = {}
        for name, param in params.items():
            if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            default = param.default if param.default is not param.empty else None
            annotation = param.annotation if param.annotation is not param.empty else (
                type(default) if isinstance(default, (bool, int, float, str)) else Any)
            out[name] = (annotation, default)
        return out
    raise KeyError(section)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def own_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = _field_default(f) if (f.default is not dataclasses.MISSING
                                         or f.default_factory is not dataclasses.MISSING) else dataclasses.MISSING
        out[f.name] = (hints[f.name], default)
    return out


class Validator:
    def __init__(self, file: Path, lines: _LineMap, overridden: set[tuple], check_paths: bool):
        self.file = file
        self.lines = lines
        self.overridden = overridden
        self.check_paths = check_paths
        self.problems: list[Problem] = []

    def problem(self, path: tuple, message: str) -> None:
        dotted = ".".join(str(p) for p in path)
        from_cli = any(path[: len(o)] == o for o in self.overridden)
        self.problems.append(Problem(dotted, message, self.lines.get(path), "command line" if from_cli else None))

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
        for key in data:
            if key not in TOP_LEVEL:
                suggestion = closest(str(key), TOP_LEVEL)
                hint = f"; did you mean {suggestion}?" if suggestion else f"; sections are {', '.join(TOP_LEVEL)}"
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
        self.check_conflicts(training, quantization, model)
        if self.problems:
            raise RecipeError(self.file, self.problems)
        return Recipe(model=model, data=dataset, lora=lora, training=training, quantization=quantization,
                      early_stopping=early, launch=launch, file=self.file.resolve())

    def validate_launch(self, values: Any, quantization: dict | None) -> dict:
        fields = own_fields(LaunchSection)
        launch = self.fill_defaults(("launch",), self.check_mapping(("launch",), values, fields), fields)
        if isinstance(launch.get("num_processes"), int) and launch["num_processes"] < 1:
            self.problem(("launch", "num_processes"), "must be at least 1")
        config = launch.get("accelerate_config")
        if isinstance(config, str):
            path = self.local_path(config)
            if path is None or not path.is_file():
                self.problem(("launch", "accelerate_config"), f"file not found: {config} "
                             "(shipped configs are in recipes/accelerate/)")
                return launch
            launch["accelerate_config"] = str(path)
            from lorakit.launch import incompatibility

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
            local = self.local_path(name)
            if local is not None:
                model["name_or_path"] = str(local)
                if not (local / "config.json").exists():
                    self.problem(("model", "name_or_path"), f"{local} is a folder but holds no config.json, "
                                 "so it is not a Hugging Face model folder")
            elif looks_like_path(name):
                self.problem(("model", "name_or_path"), f"no such folder: {name} (nor a Hub id of the form owner/name)")
        template = model.get("chat_template")
        if isinstance(template, str) and "{" not in template and template not in SHIPPED_CHAT_TEMPLATES:
            path = self.local_path(template)
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
                local = self.local_path(name)
                if local is not None:
                    source["path"] = str(local)
                    if local.is_file() and local.suffix.lower() not in LOCAL_DATA_EXTENSIONS:
                        self.problem(where + ("path",), f"{local.name}: unsupported file type; use one of "
                                     + ", ".join(LOCAL_DATA_EXTENSIONS))
                elif looks_like_path(name):
                    self.problem(where + ("path",), f"file not found: {name}")
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
        fields = upstream_fields("training")
        given = self.check_mapping(("training",), values, fields, extra_hint=TRAINING_KEYS_OWNED_ELSEWHERE)
        training = {**TRAINING_DEFAULTS, **given}
        if not training.get("output_dir"):
            training["output_dir"] = str(Path("runs") / self.file.stem)
        training["output_dir"] = str(Path(training["output_dir"]).expanduser().absolute())
        positive = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
        for key in positive:
            value = training.get(key)
            if isinstance(value, (int, float)) and value <= 0:
                self.problem(("training", key), "must be positive")
        if training.get("bf16") and training.get("fp16"):
            self.problem(("training", "fp16"), "conflicts with training.bf16: choose one")
        max_steps = training.get("max_steps", -1)
        epochs = training.get("num_train_epochs")
        if isinstance(epochs, (int, float)) and epochs <= 0 and not (isinstance(max_steps, int) and max_steps > 0):
            self.problem(("training", "num_train_epochs"), "must be positive (or set training.max_steps)")
        warmup = training.get("warmup_steps")
        if isinstance(warmup, (int, float)) and warmup < 0:
            self.problem(("training", "warmup_steps"), "must be >= 0 (a float below 1 is a ratio of total steps)")
        return training

    def check_conflicts(self, training: dict, quantization: dict | None, model: dict) -> None:
        if quantization and training.get("fp16") and model.get("dtype") == "bfloat16":
            self.problem(("training", "fp16"), "conflicts with model.dtype: bfloat16")
        if training.get("use_cpu") and model.get("device") not in ("auto", "cpu"):
            self.problem(("training", "use_cpu"), f"conflicts with model.device: {model.get('device')}")

    # -- paths
    def local_path(self, name: str) -> Path | None:
        """A local file or folder for `name`, looked up from the working directory, then beside the recipe."""
        expanded = Path(name).expanduser()
        for candidate in (expanded, self.file.parent / expanded):
            if candidate.exists():
                return candidate.resolve()
        return None


def looks_like_path(name: str) -> bool:
    """True when `name` cannot be a Hub id, so a missing local path is an error rather than a download."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    if Path(name).suffix.lower() in LOCAL_DATA_EXTENSIONS + (".jinja", ".yaml", ".yml"):
        return True
    return name.count("/") > 1
