"""Where a DPO run starts: a base model, on which a new LoRA adapter is trained, or a finished lorakit run folder
(an SFT run, say), whose adapter is trained further.

Read from the run folder's own files (adapter_config.json, lorakit_recipe.yaml, lorakit_run.json); nothing is
loaded here, so a recipe is checked before any weight is. Imports no lorakit.recipe module: recipe validation
calls into this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import LorakitError
from lorakit.training.run_dir import RECIPE_FILE, RECORD_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The adapter settings a recipe's lora section holds, read back from a run's adapter_config.json.
ADAPTER_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type")
# Model keys that say which base was trained and how it reads text: the start run's. The others (dtype,
# attention, device) say where this run computes: this recipe's.
BASE_KEYS = ("name_or_path", "revision", "trust_remote_code")


@dataclass
class StartRun:
    """A finished run folder to continue from."""

    folder: Path
    command: str  # the command that trained it: sft, or dpo for a second round
    model: dict[str, Any]  # the model section of its base (resolved through every earlier stage)
    quantization: dict | None
    adapter_config: dict[str, Any]
    lora: dict[str, Any]  # the adapter's lora section: its recipe's, else read from adapter_config.json
    stages: list[dict[str, Any]]  # every stage that made the adapter, first to last: command, run, datasets


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_start_run(folder: str | Path) -> StartRun:
    """The run in `folder`; a folder that is not a finished run, or whose base cannot be told, is an error."""
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise LorakitError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: not a finished run to "
                           "start from (an unfinished run keeps its adapter in checkpoint-* folders)")
    adapter_config = read_json(folder / ADAPTER_CONFIG)
    if adapter_config.get("peft_type") not in (None, "LORA"):
        raise LorakitError(f"{folder} holds a {adapter_config.get('peft_type')} adapter; lorakit continues LoRA "
                           "adapters only")
    record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else {}
    if record and record.get("status") != "completed":
        raise LorakitError(f"{folder} holds a run that is {record.get('status')}, not completed; finish it first "
                           f"(run the same command on {folder / RECIPE_FILE} again) or start from another run")
    recipe = read_yaml(folder / RECIPE_FILE) if (folder / RECIPE_FILE).is_file() else None
    command = record.get("command") or (recipe_command(folder / RECIPE_FILE) if recipe else "sft")
    if recipe is None:  # a plain peft adapter folder: its config names the base
        base = adapter_config.get("base_model_name_or_path")
        if not base:
            raise LorakitError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path and the folder has no "
                               f"{RECIPE_FILE}, so its base model is unknown")
        model = {"name_or_path": base, "revision": adapter_config.get("revision")}
        return StartRun(folder, command, model, None, adapter_config, adapter_settings(adapter_config),
                        [{"command": command, "run": str(folder), "datasets": []}])
    model = dict(recipe.get("model") or {})
    stages = []
    if command == "dpo" and is_run_folder(model.get("name_or_path", "")):
        earlier = read_start_run(model["name_or_path"])  # a second round of DPO: the base is the first's
        model = {**model, **{key: earlier.model.get(key) for key in BASE_KEYS},
                 "chat_template": model.get("chat_template") or earlier.model.get("chat_template")}
        stages = earlier.stages
    stages.append({"command": command, "run": str(folder), "datasets": source_names(recipe.get("data") or {})})
    lora = recipe.get("lora") if isinstance(recipe.get("lora"), dict) else {}
    if lora.get("r") != adapter_config.get("r"):  # a recipe edited since: the adapter's own file is the truth
        lora = adapter_settings(adapter_config)
    return StartRun(folder, command, model, recipe.get("quantization"), adapter_config, lora, stages)


def base_model_section(model: dict[str, Any], start: StartRun | None) -> dict[str, Any]:
    """The model section to load for a run whose recipe's model section is `model`: the base itself, or, for a
    run folder, the base that run trained (its chat template unless this recipe names one)."""
    if start is None:
        return dict(model)
    return {**model, **{key: start.model.get(key) for key in BASE_KEYS},
            "chat_template": model.get("chat_template") or start.model.get("chat_template")}


def trained_base_section(model: dict[str, Any], record: dict | None) -> dict[str, Any]:
    """The base model section of a finished DPO run whose recipe's model section is `model`: through the run folder
    it started from, or, when that folder is gone, the base its run record names."""
    name = model.get("name_or_path", "")
    if is_run_folder(name):
        return base_model_section(model, read_start_run(name))
    recorded = (record or {}).get("base_model") or {}
    if recorded.get("name_or_path") and recorded["name_or_path"] != name:
        return {**model, "name_or_path": recorded["name_or_path"], "revision": recorded.get("revision")}
    return dict(model)


def adapter_settings(config: dict[str, Any]) -> dict[str, Any]:
    """An adapter_config.json's shape, in lora-section keys."""
    settings = {key: config[key] for key in ADAPTER_KEYS if key in config}
    if isinstance(settings.get("target_modules"), list):
        settings["target_modules"] = sorted(settings["target_modules"])
    return settings


# ---------------------------------------------------------------- recipe checks of `lorakit dpo`


def check_dpo_recipe(validator, raw: dict, model: dict, lora: dict, data: dict, sections: dict) -> dict:
    """What only a DPO recipe can get wrong, reported through `validator.problem`; returns the lora section
    (the start run's adapter, when the run continues one)."""
    name = model.get("name_or_path")
    preference = sections.get("preference") or {}
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    start = None
    if validator.check_paths and isinstance(name, str) and is_run_folder(name):
        try:
            start = read_start_run(name)
        except LorakitError as error:
            validator.problem(("model", "name_or_path"), str(error))
    if start is not None:
        settings = start.lora
        if raw.get("lora") is not None:  # a warning: a recipe for a base model may be pointed at an SFT run
            validator.warning(("lora",), f"ignored: {name} holds the adapter this run trains further "
                              f"(r={settings.get('r')}, lora_alpha={settings.get('lora_alpha')}), whose shape is fixed")
        lora = {**lora, **settings}
        if preference.get("reference") == "base" and training.get("precompute_ref_log_probs"):
            # trl precomputes while it builds the trainer, with the SFT copy as reference, before lorakit removes it
            validator.problem(("training", "precompute_ref_log_probs"), "not with preference.reference: base from "
                              "a run folder: the reference log-probabilities would be the SFT model's")
    elif preference.get("reference") == "sft" and validator.check_paths:
        validator.problem(("preference", "reference"), "sft needs model.name_or_path to be a finished SFT run folder "
                          "(runs/my-sft); from a base model the reference is the base")
    if data.get("train_on") == "all":
        validator.problem(("data", "train_on"), "DPO scores the responses only (each reply with its end-of-turn "
                          "token); remove data.train_on")
    for split in ("train", "eval"):
        for index, source in enumerate(data.get(split) or []):
            if source.get("format"):
                validator.problem(("data", split, index, "format"), f"{source['format']} is a format of sft data; "
                                  "lorakit dpo reads preference pairs (chosen, rejected and a prompt): remove format "
                                  "and map other column names with columns:")
    if training.get("sync_ref_model"):
        validator.problem(("training", "sync_ref_model"), "not with a LoRA adapter: the reference is the frozen "
                          "start adapter (or the base), not a separate model trl could update")
    if training.get("model_init_kwargs") is not None:
        validator.problem(("training", "model_init_kwargs"), "lorakit loads the model itself from model: and "
                          "quantization:; set those instead")
    return lora


# ---------------------------------------------------------------- files


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LorakitError(f"{path} cannot be read: {error}") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{path} must hold a JSON object")
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise LorakitError(f"{path} cannot be read: {error}") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{path} is not a recipe (a mapping of sections)")
    return value


def recipe_command(path: Path) -> str:
    """The command a recipe file is for, from its opening `# lorakit COMMAND ...` line (sft when it has none)."""
    try:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    except (OSError, UnicodeDecodeError):
        return "sft"
    words = first.lstrip("# ").split()
    return words[1] if len(words) > 1 and words[0] == "lorakit" and words[1] in ("sft", "dpo", "classify") else "sft"


def source_names(data: dict) -> list[str]:
    """The paths or Hub ids of a data section's train and eval sources."""
    names = []
    for split in ("train", "eval"):
        for source in data.get(split) or []:
            path = source.get("path") if isinstance(source, dict) else source
            if isinstance(path, str) and path not in names:
                names.append(path)
    return names
