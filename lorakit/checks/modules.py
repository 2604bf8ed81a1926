"""Whether `lora.target_modules` names layers the model has, found from its config alone (no weights loaded).

peft decides what a target matches (exact names, suffixes, a regex, all-linear); it is asked here on a skeleton
of the model built on the meta device, so a recipe that adapts nothing is a recipe error at its line, listing
the model's linear layers, before gigabytes are loaded, instead of peft's traceback after.
"""

from __future__ import annotations

from typing import Any

from lorakit.errors import Problem, RecipeError
from lorakit.recipe.sections import LORA_DEFAULTS, Recipe

# The transformers class each training command loads its model with (the layer names differ only in the head).
AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification"}


def check_target_modules(recipe: Recipe, config: Any | None = None) -> None:
    """Raise RecipeError (exit 2) at lora.target_modules when peft would adapt nothing of the model, or cannot
    adapt what it names. A model whose config cannot be read is left to loading, which says why."""
    import torch
    import transformers
    from peft import LoraConfig, inject_adapter_in_model

    if (recipe.sections.get("task") or {}).get("head_only"):
        return  # no LoRA at all: only the task head is trained
    if config is None:
        config = model_config(recipe)
        if config is None:
            return
    auto_class = getattr(transformers, AUTO_CLASSES.get(recipe.command, "AutoModelForCausalLM"))
    trust = recipe.model.get("trust_remote_code", False)
    try:
        with torch.device("meta"):
            skeleton = auto_class.from_config(config, trust_remote_code=trust)
    except (ValueError, KeyError, TypeError):  # a config this class cannot build: loading reports it properly
        return
    settings = {key: value for key, value in recipe.lora.items() if key != "task_type"}
    try:
        inject_adapter_in_model(LoraConfig(**settings), skeleton, low_cpu_mem_usage=True)
    except ValueError as error:
        raise RecipeError(recipe.file, [target_problem(recipe, skeleton, error)]) from None


def model_config(recipe: Recipe) -> Any | None:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(recipe.model["name_or_path"], revision=recipe.model.get("revision"),
                                          trust_remote_code=recipe.model.get("trust_remote_code", False))
    except Exception:  # missing, offline, a run folder (dpo's start point): whoever loads the model says why
        return None


def target_problem(recipe: Recipe, skeleton, error: ValueError) -> Problem:
    from lorakit.recipe.load import line_of

    targets = recipe.lora.get("target_modules")
    shown = f"[{', '.join(targets)}]" if isinstance(targets, list) else repr(targets)
    linear = linear_layer_names(skeleton)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "not found in the base model" in reason or "No modules were targeted" in reason:
        message = (f"{shown} matches no layer of {recipe.model['name_or_path']}; its linear layers are "
                   f"{', '.join(linear)} (or write all-linear for every one of them)")
        if isinstance(targets, str):
            message += ("; a single string is a regular expression that must match a whole module name "
                        "(model.layers.0.self_attn.q_proj): for names, write a list such as [q_proj, v_proj]")
    else:
        message = f"peft cannot adapt {shown} in {recipe.model['name_or_path']}: {reason}"
    line = line_of(recipe.file, ("lora", "target_modules")) if recipe.file else None
    # Not in the file, and not lorakit's default: it came from an override on the command line.
    source = "command line" if line is None and targets != LORA_DEFAULTS["target_modules"] else None
    return Problem("lora.target_modules", message, line, source)


def linear_layer_names(model) -> list[str]:
    """The distinct names of the model's linear layers (q_proj, k_proj, ..., down_proj), the output layer last."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, last = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2 style layers
            leaf = name.rsplit(".", 1)[-1]
            bucket = last if module is output else names
            if leaf not in names and leaf not in last:
                bucket.append(leaf)
    return names + last
