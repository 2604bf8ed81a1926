"""What an export starts from: a run folder (merged in memory first, QLoRA included) or a merged model folder.

Either way the result is a plain model folder the converters read, the tokenizer with the chat template of
training, a few conversations to check on (from the run's own data first), and what the fine-tuned model itself
answers on them: measured on base + adapter for a run, before the merge, so every export is checked against the
model that was trained and not against the merged copy. One copy of the weights is ever held.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from lorakit.errors import LorakitError

CHECKS_FROM_DATA = 3  # conversations taken from the run's data; lorakit's fixed prompts follow
FIXED_CHECKS = 3
# Keys transformers 5 saves in tokenizer_config.json that describe where it was loaded from, not the tokenizer.
LOADING_KEYS = ("is_local", "local_files_only")
# Files of a model folder the converters read besides the weights.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
               "chat_template.jinja", "chat_template.json")


@dataclass
class Source:
    name: str  # as the user gave it
    kind: str  # "run" or "merged"
    folder: Path  # a plain model folder (merged weights, tokenizer, chat template) the converters read
    tokenizer: Any
    placement: Any
    conversations: list[list[dict]]
    trained_system: str | None  # the system prompt every conversation of the run's data starts with, if one
    reference: Any  # what `measure` returned for the fine-tuned model
    base_name: str | None
    target: Any  # lorakit.models.inference.Target
    notes: list[str] = field(default_factory=list)


def prepare_source(name: str, staging: Path, measure: Callable[[Any, Any, list, Path], Any], *,
                   dtype: str = "auto", device: str = "cpu") -> Source:
    """Resolve NAME, measure the fine-tuned model with `measure(model, tokenizer, conversations, folder)`, and
    write the plain folder the converters read into `staging`."""
    from lorakit.models.inference import resolve_target
    from lorakit.models.loading import load_tokenizer, quiet_upstream_logs
    from lorakit.models.merge import check_adapter_fits, load_config, merge_placement

    quiet_upstream_logs()
    target = resolve_target(name)
    folder = target.folder
    if folder is None:
        raise LorakitError(f"{name}: lorakit export takes a run folder, a recipe of a finished run or a merged model "
                           "folder (download a Hub model first, or export the run you fine-tuned from it)")
    section = dict(target.model_section)
    config = load_config(section)
    tokenizer, _ = load_tokenizer({"name_or_path": target.tokenizer_path,
                                   "trust_remote_code": section.get("trust_remote_code", False)})
    placement = merge_placement(dtype, device, config)
    conversations, trained_system = check_conversations(target)
    if target.kind == "adapter":
        run = target.adapter_path
        check_adapter_fits(run, target, section, config, tokenizer)
        reference = merge_run_in_memory(target, section, placement, staging, tokenizer,
                                        lambda model: measure(model, tokenizer, conversations, folder))
        notes = [*target.notes]
        if (target.quantization or {}).get("load_in_4bit") or (target.quantization or {}).get("load_in_8bit"):
            notes.append("trained on the base quantized by bitsandbytes; merged into and checked against the base "
                         "in full precision + adapter (the base's 4-bit rounding is not in the export)")
        return Source(name, "run", staging, tokenizer, placement, conversations, trained_system, reference,
                      section["name_or_path"], target, notes)
    from lorakit.models.loading import load_model

    click.echo(f"  loading {folder} on {placement.device} in {placement.dtype}")
    model = load_model(section, None, placement).eval()
    reference = measure(model, tokenizer, conversations, folder)
    del model
    gc.collect()
    copy_model_folder(folder, staging)
    return Source(name, "merged", staging, tokenizer, placement, conversations, trained_system, reference, target.base_name, target)


def merge_run_in_memory(target, section: dict, placement, staging: Path, tokenizer,
                        measure: Callable[[Any], Any]) -> Any:
    """Base (in 16/32-bit, also for a QLoRA run) + adapter, measured, then merged in place and written to
    `staging` (as `lorakit merge` writes it). Returns what `measure` returned."""
    from lorakit.models.inference import attach_adapter
    from lorakit.models.loading import load_model
    from lorakit.models.merge import write_model_folder

    click.echo(f"  loading the base {section['name_or_path']} on {placement.device} in {placement.dtype}"
               + (" (not 4-bit: the adapter is merged into full-precision weights)" if target.quantization else ""))
    model = attach_adapter(load_model(section, None, placement), target.adapter_path, section["name_or_path"])
    reference = measure(model.eval())
    click.echo("  merging")
    write_model_folder(model.merge_and_unload(), tokenizer, staging)
    del model
    gc.collect()
    clean_tokenizer_config(staging)
    return reference


def copy_model_folder(folder: Path, staging: Path) -> None:
    """The folder's weights (linked, not copied) and config/tokenizer files (copied, loading keys removed)."""
    staging.mkdir(parents=True)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index.json"))
    if not weights:
        raise LorakitError(f"{folder} holds no safetensors weights; lorakit exports safetensors models only")
    for path in weights:
        (staging / path.name).symlink_to(path.resolve())
    for name in MODEL_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, staging / name)
    clean_tokenizer_config(staging)


def clean_tokenizer_config(folder: Path) -> None:
    """Remove the loading-time keys transformers 5 writes; other readers of the folder trip over them."""
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if any(key in config for key in LOADING_KEYS):
        for key in LOADING_KEYS:
            config.pop(key, None)
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- what the checks run on


def check_conversations(target) -> tuple[list[list[dict]], str | None]:
    """Up to CHECKS_FROM_DATA conversations of the run's own data (eval data first), then lorakit's fixed ones;
    and the system prompt the data always used, if it always used one.

    Each conversation ends with a user turn: the export must answer it as the fine-tuned model does.
    """
    from lorakit.models.merge import CHECK_PROMPTS

    found: list[list[dict]] = []
    systems: list[str | None] = []
    data = (target.recipe.data if target.recipe is not None else None) or {}
    for source in [*(data.get("eval") or []), *(data.get("train") or [])]:
        if len(found) >= CHECKS_FROM_DATA:
            break
        conversations, seen = prompts_of_source(source, CHECKS_FROM_DATA - len(found))
        found += conversations
        systems += seen
    trained_system = systems[0] if systems and systems[0] and len(set(systems)) == 1 else None
    return found + [list(messages) for messages in CHECK_PROMPTS[:FIXED_CHECKS]], trained_system


def prompts_of_source(source: dict, count: int) -> tuple[list[list[dict]], list[str | None]]:
    """The first rows of a data source that are conversations, cut before their last assistant reply, and the
    system prompt of each conversation row read (None: it had none).

    Data that is gone or unreadable only means the fixed prompts are used; the export does not need it.
    """
    from lorakit.data.formats import row_to_example
    from lorakit.data.sources import detect_format, load_source
    from lorakit.errors import DataError

    try:
        dataset = load_source(source)
        renames = {src: dst for dst, src in (source.get("columns") or {}).items() if src in dataset.column_names}
        if renames:
            dataset = dataset.rename_columns(renames)
        fmt = source.get("format") or detect_format(dataset.column_names, source["path"])
    except (DataError, OSError, ValueError):
        return [], []
    found, systems = [], []
    for index in range(min(len(dataset), 50)):
        try:
            example = row_to_example(dataset[index], fmt)
        except ValueError:
            continue
        messages = example.get("messages") or []
        if not messages:
            continue
        systems.append(messages[0]["content"] if messages[0].get("role") == "system" else None)
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0)
        if len(found) < count and last > 0 and all(isinstance(m.get("content"), str) for m in messages[:last]):
            found.append([{"role": m["role"], "content": m["content"]} for m in messages[:last]])
    return found, systems
