"""Loading what `lorakit eval` and `lorakit generate` point at, and batched greedy generation.

A TARGET is one of:
  * a run folder (adapter_config.json + adapter weights, as `lorakit sft` writes it): the base model it was trained
    on, loaded as in training (4-bit when the recipe was QLoRA), with the adapter on top;
  * a recipe file: the run in its training.output_dir, with the recipe's own eval data;
  * a model folder (a `lorakit merge` output, or any Hugging Face model folder);
  * a Hub model id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import LorakitError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_RECORD = "lorakit_merge.json"


@dataclass
class Target:
    """A TARGET resolved to files: which model to load, on which base, with which recipe."""

    name: str  # as the user wrote it
    kind: str  # "adapter" (a run folder or recipe) or "model" (a model folder or Hub id)
    model_section: dict[str, Any]  # for load_model: the base of an adapter, else the model itself
    tokenizer_path: str  # a run folder holds the tokenizer and chat template training used
    adapter_path: Path | None = None
    quantization: dict | None = None  # the recipe's, so a QLoRA run is evaluated on the 4-bit base it trained on
    recipe: Any = None  # lorakit.recipe.Recipe, when the target has one
    base_name: str | None = None  # what --compare-base compares with; None when unknown
    notes: list[str] = field(default_factory=list)
    merged_from: Path | None = None  # a merged folder: the run folder its lorakit_merge.json names

    @property
    def folder(self) -> Path | None:
        """Where lorakit may write its report by default: the run or model folder (never for a Hub id)."""
        if self.adapter_path is not None:
            return self.adapter_path
        local = Path(self.model_section["name_or_path"])
        return local if local.is_dir() else None


def resolve_target(target: str) -> Target:
    """Tell what TARGET is from the files it names; every dead end says what would work."""
    from lorakit.recipe.sections import looks_like_path

    path = Path(target).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            return _recipe_target(target, path)
        raise LorakitError(f"{target} is a file, not a run folder, model folder, recipe (.yaml) or Hub id")
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return _run_target(target, path)
        if (path / "config.json").is_file():
            return _model_folder_target(target, path)
        if any(path.glob(f"checkpoint-*/{ADAPTER_CONFIG}")):
            raise LorakitError(f"{target} holds checkpoints but no finished adapter: the run did not complete. "
                               f"Resume it with `lorakit sft {path / 'lorakit_recipe.yaml'}`, or point at one of its "
                               "checkpoint-* folders")
        raise LorakitError(f"{target} holds neither an adapter ({ADAPTER_CONFIG}) nor a model (config.json); "
                           "give a lorakit run folder, a merged model folder, a recipe or a Hub id")
    if looks_like_path(target):
        raise LorakitError(f"{target}: no such file or folder")
    return Target(name=target, kind="model", model_section={"name_or_path": target}, tokenizer_path=target)


def _recipe_target(name: str, file: Path) -> Target:
    from lorakit.models.start_point import recipe_command
    from lorakit.recipe.load import load_recipe

    recipe = load_recipe(file, command=recipe_command(file))
    out = recipe.output_dir
    if not (out / ADAPTER_CONFIG).is_file():
        raise LorakitError(f"{name}: its output folder {out} holds no trained adapter yet; "
                           f"train it first with `lorakit sft {name}`")
    return _adapter_target(name, out, recipe)


def _run_target(name: str, folder: Path) -> Target:
    from lorakit.models.start_point import recipe_command
    from lorakit.recipe.load import load_recipe
    from lorakit.training.run_dir import RECIPE_FILE

    recipe = None
    if (folder / RECIPE_FILE).is_file():
        # The resolved recipe already holds absolute paths; data that has moved since is reported when it is read.
        recipe = load_recipe(folder / RECIPE_FILE, check_paths=False, command=recipe_command(folder / RECIPE_FILE))
    return _adapter_target(name, folder, recipe)


def _adapter_target(name: str, folder: Path, recipe) -> Target:
    if not any((folder / weights).is_file() for weights in ADAPTER_WEIGHTS):
        raise LorakitError(f"{folder} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    notes = []
    if recipe is not None:
        model_section = dict(recipe.model)
        quantization = recipe.quantization
        if recipe.command == "dpo":  # model.name_or_path may be the SFT run it continued: load that run's base
            from lorakit.models.start_point import trained_base_section
            from lorakit.training.run_dir import read_record

            record = read_record(folder) or {}
            model_section = trained_base_section(model_section, record)
            stages = " -> ".join(stage["command"] for stage in record.get("stages") or [])
            if stages:
                notes.append(f"trained in stages {stages} on the base {model_section['name_or_path']}")
    else:
        base = read_adapter_config(folder).get("base_model_name_or_path")
        if not base:
            raise LorakitError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path and the folder has no "
                               "lorakit_recipe.yaml, so the base model is unknown")
        model_section = {"name_or_path": base}
        quantization = None
        notes.append("no lorakit_recipe.yaml: the base is taken from adapter_config.json and loaded unquantized")
    # A peft adapter folder from elsewhere may hold no tokenizer; the base's is then the one it was trained with.
    tokenizer_path = str(folder) if (folder / "tokenizer_config.json").is_file() else model_section["name_or_path"]
    return Target(name=name, kind="adapter", model_section=model_section, tokenizer_path=tokenizer_path,
                  adapter_path=folder, quantization=quantization, recipe=recipe,
                  base_name=model_section["name_or_path"], notes=notes)


def _model_folder_target(name: str, folder: Path) -> Target:
    base_name, merged_from = None, None
    record_file = folder / MERGE_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        base_name = record.get("base_model", {}).get("name_or_path")
        merged_from = Path(record["run_dir"]) if record.get("run_dir") else None
    return Target(name=name, kind="model", model_section={"name_or_path": str(folder.resolve())},
                  tokenizer_path=str(folder), base_name=base_name, merged_from=merged_from)


def read_adapter_config(folder: Path) -> dict:
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LorakitError(f"{folder / ADAPTER_CONFIG} cannot be read: {error}") from None


# ---------------------------------------------------------------- loading


def load_target_tokenizer(target: Target):
    """The tokenizer the data is tokenized with, chat template included.

    For a run with its recipe, the tokenizer exactly as `lorakit sft` loaded it to tokenize the training data.
    (sft saves this same tokenizer in the run folder, its EOS unchanged; stop tokens go to generation_config.json.)
    Otherwise the folder's or Hub model's own tokenizer.
    """
    from lorakit.models.loading import load_tokenizer

    if target.recipe is not None:
        section = target.model_section  # the recipe's model section; for a DPO run, that of the base it trained
    else:
        section = {"name_or_path": target.tokenizer_path,
                   "trust_remote_code": target.model_section.get("trust_remote_code", False)}
        if target.kind == "model":
            section["revision"] = target.model_section.get("revision")
    tokenizer, source = load_tokenizer(section)
    if target.recipe is None and "has none" in source:  # a run's recipe trained with this same fallback
        import click

        click.echo(f"lorakit: {target.name} has no chat template; prompts are formatted with lorakit's ChatML "
                   "(<|im_start|>role ... <|im_end|>), which this model may never have seen. Give it the template "
                   "it was trained with (chat_template.jinja in the folder) for meaningful replies", err=True)
    return tokenizer


def load_target_model(target: Target, placement) -> Any:
    """The model ready for inference: base (+ bitsandbytes as trained) with the adapter, or the model alone."""
    from lorakit.models.loading import load_model

    model = load_model(target.model_section, target.quantization, placement)
    if target.adapter_path is not None:
        model = attach_adapter(model, target.adapter_path, target.model_section["name_or_path"])
    model.eval()
    return model


def load_base_model(name_or_path: str, placement) -> Any:
    """The base of a merged folder alone, for --compare-base (a run compares with its adapter disabled instead)."""
    from lorakit.models.loading import load_model

    model = load_model({"name_or_path": name_or_path}, None, placement)
    model.eval()
    return model


def attach_adapter(model, adapter_path: Path, base_name: str, trainable: bool = False) -> Any:
    """peft's PeftModel on `model`; a base that does not fit the adapter is a clear error, not a shape traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()
        reason = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise LorakitError(f"the adapter in {adapter_path} does not fit the base model {base_name}: {reason}. "
                           "Was it trained on another model?") from None


# ---------------------------------------------------------------- generation


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Where a reply ends: EOS, the chat template's end-of-turn token, and the model's own EOS ids."""
    from lorakit.models.loading import end_of_turn_token

    ids = [tokenizer.eos_token_id]
    end = end_of_turn_token(tokenizer)
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation rendered by the chat template, ending with the assistant's turn opening."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


def generate_greedy(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                    on_batch: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched with left padding; each ends at its first stop token.

    Prompts are batched longest first, so each batch holds prompts of similar length (little padding),
    and the results come back in the prompts' order.
    """
    import torch
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chosen)
        ids = torch.full((len(chosen), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, index in enumerate(chosen):
            prompt = prompts[index]
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, index in enumerate(chosen):
            results[index] = cut_at_stop(output[row, width:].tolist(), stops)
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return results


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """The generated ids up to (not including) the first stop token."""
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position]
    return ids


def decode_reply(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
