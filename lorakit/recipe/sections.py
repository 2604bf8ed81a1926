"""What a recipe is: its sections, lorakit's defaults for upstream sections, and the validated Recipe.

A recipe has lorakit's own sections (`model`, `data`, `early_stopping`, `launch`) and sections that belong to
upstream libraries (`quantization` -> transformers.BitsAndBytesConfig, `lora` -> peft.LoraConfig, `training` ->
the command's trainer config, e.g. trl.SFTConfig). Upstream sections keep upstream key names and are checked
against the upstream classes' own fields, so every upstream option works without lorakit naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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
        "Processes to launch (usually one per GPU; on a CPU, see docs/distributed.md). Same as `lorakit sft "
        "--num-processes`; null: the config's or 1. Each gets the machine's cores divided among them as threads, "
        "unless OMP_NUM_THREADS is set.",
        None,
    )


@dataclass
class TaskSection:
    """`lorakit classify`'s own section: what the rows hold and what the new head predicts."""

    type: Literal["classification", "multi_label", "regression"] = doc(
        "classification: one label per row (cross-entropy). multi_label: a list of labels per row, any number of "
        "them (binary cross-entropy per label). regression: one number per row (mean squared error).",
        "classification",
    )
    text_column: str = doc("Column with the text to label.", "text")
    text_pair_column: str | None = doc(
        "Column with a second text, for pairs (NLI, similarity): both are encoded together, as the tokenizer joins "
        "pairs. null: single texts.",
        None,
    )
    label_column: str = doc("Column with the label: a name or whole number, a list of them for multi_label, "
                            "a number for regression.", "label")
    labels: list[str] | None = doc(
        "The label names in order (a name's position is its class id). null: the names found in the training data, "
        "sorted. Whole numbers in the data are positions in this list, unless every name is itself a number.",
        None,
    )
    class_weights: Literal["balanced"] | None = doc(
        "balanced: each class's loss weighs rows / (classes x its rows), so a rare class counts as much as a "
        "common one (multi_label: each label's positives weigh its negatives / positives). null: every row alike.",
        None,
    )
    bad_labels: Literal["error", "drop"] = doc(
        "A row whose label is missing, unknown, or of the wrong kind for task.type: error stops with its file "
        "and row; drop leaves it out and counts it in the summary.",
        "error",
    )
    head_only: bool = doc("Train only the new head (a linear probe): no LoRA, the whole base model frozen.", False)


@dataclass
class PreferenceSection:
    """`lorakit dpo`'s own section: what the policy is measured against, and what to do with unusable pairs."""

    reference: Literal["sft", "base"] | None = doc(
        "The reference model DPO's rewards compare the policy with. null: the start point, i.e. the SFT model "
        "(the base + a frozen copy of the SFT adapter) when model.name_or_path is an SFT run folder, else the base. "
        "sft: insist on that. base: the bare base model, also when starting from an SFT run.",
        None,
    )
    on_bad_rows: Literal["error", "drop"] = doc(
        "A pair with a field missing, an empty response, or chosen equal to rejected: error stops with its file "
        "and row; drop leaves it out and counts it in the summary and the run record.",
        "error",
    )


@dataclass
class EvaluationSection:
    """What `lorakit eval` scores a fine-tune's replies with (an sft recipe's own section); see docs/eval.md."""

    metrics: list[Literal["exact_match", "token_f1", "rouge_l", "chrf", "bleu"]] = doc(
        "Reply metrics besides the loss: exact_match and token_f1 (short answers, extraction), rouge_l "
        "(summaries), chrf and bleu (translation). rouge_l needs `pip install rouge-score`, chrf and bleu "
        "`pip install sacrebleu`. Same as `lorakit eval --metrics`.",
        ["exact_match", "token_f1"],
    )


OWN_SECTIONS = {"model": ModelSection, "data": DataSection, "early_stopping": EarlyStoppingSection,
                "launch": LaunchSection}
UPSTREAM_SECTIONS = {
    "quantization": "transformers.BitsAndBytesConfig",
    "lora": "peft.LoraConfig",
    "training": "trl.SFTConfig",  # for sft; each training command's own class is in TRAINING_CONFIGS
}
TOP_LEVEL = ("model", "quantization", "lora", "data", "training", "early_stopping", "launch")
# The upstream config class behind `training:`, per training command.
TRAINING_CONFIGS = {
    "sft": "trl.SFTConfig",
    "dpo": "trl.DPOConfig",
    "classify": "transformers.TrainingArguments",
}
# Sections of lorakit's own that only one training command has: {command: {section: dataclass}}. Their values end
# up in Recipe.sections, checked and with defaults filled like the shared sections.
COMMAND_SECTIONS: dict[str, dict[str, type]] = {"sft": {"evaluation": EvaluationSection}, "dpo": {"preference": PreferenceSection},
                                                "classify": {"task": TaskSection}}
# What `lorakit classify` measures on eval data, per task.type (Trainer logs them as eval_<name>), besides the loss;
# training.metric_for_best_model names one of them.
CLASSIFY_METRICS = {
    "classification": ("accuracy", "f1_macro", "f1_micro"),
    "multi_label": ("f1_macro", "f1_micro", "exact_match"),
    "regression": ("mse", "pearson", "spearman"),
}

# lorakit's defaults for upstream sections, where upstream's are not fit for LoRA (each says why).
LORA_DEFAULTS = {
    "r": 16,
    "lora_alpha": 32,  # alpha = 2r, the usual LoRA scaling
    # Dropout on the adapter inputs cost 25% of the tokens/s and 15% more peak memory in benchmarks/bench_sft.py
    # (docs/benchmarks.md); set it for small data sets that overfit.
    "lora_dropout": 0.0,
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
# Where a training command needs another default than TRAINING_DEFAULTS' (each says why).
COMMAND_TRAINING_DEFAULTS = {
    # trl's 1e-6 is for full fine-tuning; 5e-6 is what LLaMA-Factory's and unsloth's LoRA DPO examples use. DPO
    # moves log-probability ratios, which an SFT rate of 2e-4 overshoots.
    "dpo": {"learning_rate": 5.0e-6},
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


# ---------------------------------------------------------------- the recipe


# training keys that change where the run writes or what it logs, not the weights it trains
NOT_WEIGHT_SETTINGS = ("output_dir", "logging_dir", "logging_steps", "report_to", "run_name", "overwrite_output_dir",
                       "push_to_hub", "hub_model_id", "hub_token", "disable_tqdm", "save_total_limit")


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
    command: str = "sft"  # the training command the recipe was checked for (its `training:` class)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # that command's own sections
    warnings: list = field(default_factory=list)  # lorakit.errors.Problem: likely mistakes that do not stop a run

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
        out.update(self.sections)
        return copy.deepcopy(out)

    def dump(self) -> str:
        """The resolved recipe as YAML, re-runnable as is, with secrets removed."""
        header = f"# lorakit {self.command} lorakit_recipe.yaml\n# The resolved recipe of this run: every default filled in, local paths absolute.\n"
        return header + yaml.safe_dump(redact(self.to_dict()), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """Hash of everything that decides the trained weights (not where they are written, nor logging)."""
        text = json.dumps(self.weight_settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def weight_settings(self) -> dict[str, Any]:
        """The recipe without what leaves the trained weights alone (where they go, logging, later evaluation)."""
        data = self.to_dict()
        for key in NOT_WEIGHT_SETTINGS:
            data["training"].pop(key, None)
        data.pop("evaluation", None)  # what `lorakit eval` measures later decides nothing about the weights
        return data

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


# ---------------------------------------------------------------- validation


def upstream_class(dotted: str) -> type:
    """The class named `package.Class` (imported only when a recipe is checked)."""
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def upstream_fields(section: str, command: str = "sft") -> dict[str, tuple[Any, Any]]:
    """{key: (annotation, default)} of the upstream class behind a section (for `training`, the command's own)."""
    if section == "training":
        config = upstream_class(TRAINING_CONFIGS[command])
        hints = typing.get_type_hints(config)
        return {f.name: (hints.get(f.name, Any), _field_default(f)) for f in dataclasses.fields(config) if f.init}
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


def looks_like_path(name: str) -> bool:
    """True when `name` cannot be a Hub id, so a missing local path is an error rather than a download."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    if Path(name).suffix.lower() in LOCAL_DATA_EXTENSIONS + (".jinja", ".yaml", ".yml"):
        return True
    return name.count("/") > 1
