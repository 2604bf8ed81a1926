"""What a run or merged folder says about itself, read for its model card: the recipe, run record, merge and eval
reports, peft's config; and the facts a card states from them (the base model, Hub datasets, the license)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import LorakitError
from lorakit.recipe.sections import looks_like_path
from lorakit.training.run_dir import RECIPE_FILE, RECORD_FILE

MERGE_FILE = "lorakit_merge.json"
EVAL_FILE = "lorakit_eval.json"


@dataclass
class Records:
    """What a run or merged folder says about itself; each is None when its file is absent."""

    recipe: dict | None
    record: dict | None
    merge: dict | None
    evaluation: dict | None
    adapter_config: dict | None


def read_json(path: Path) -> dict | None:
    return read_mapping(path, json.loads, "JSON", "hold a JSON object")


def read_recipe(path: Path) -> dict | None:
    return read_mapping(path, yaml.safe_load, "YAML", "be a recipe (a mapping of sections)")


def read_mapping(path: Path, parse, language: str, must: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise LorakitError(f"{path} cannot be read as {language} ({error}); fix or remove it, then push again") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{path} must {must}; fix or remove it, then push again")
    return value


def read_records(folder: Path) -> Records:
    """The folder's records; a merged folder without its own recipe and run record borrows those of the run it
    was merged from (named in lorakit_merge.json), for the card only: files outside the folder never go up."""
    merge = read_json(folder / MERGE_FILE)
    recipe, record = read_recipe(folder / RECIPE_FILE), read_json(folder / RECORD_FILE)
    run = Path(merge["run_dir"]) if merge and isinstance(merge.get("run_dir"), str) else None
    if run is not None and run.is_dir() and recipe is None and record is None:
        recipe, record = read_recipe(run / RECIPE_FILE), read_json(run / RECORD_FILE)
    return Records(recipe=recipe, record=record, merge=merge, evaluation=read_json(folder / EVAL_FILE),
                   adapter_config=read_json(folder / "adapter_config.json"))


def base_model(records: Records) -> tuple[str | None, str | None]:
    """(name_or_path, revision) of the base model, from the recipe first, then the records, then peft's config."""
    candidates = [
        ((records.recipe or {}).get("model") or {}),
        ((records.record or {}).get("base_model") or {}),
        ((records.merge or {}).get("base_model") or {}),
    ]
    if (records.record or {}).get("command") == "dpo":  # its recipe's model may be the SFT run it continued
        candidates.insert(0, (records.record or {}).get("base_model") or {})
    for found in candidates:
        if isinstance(found, str):
            return found, None
        if isinstance(found, dict) and found.get("name_or_path"):
            return str(found["name_or_path"]), found.get("revision")
    name = (records.adapter_config or {}).get("base_model_name_or_path")
    return (str(name), (records.adapter_config or {}).get("revision")) if name else (None, None)


def is_hub_id(name: str | None) -> bool:
    """True for owner/name (or a bare name) on the Hub; False for a local path, which must never reach the metadata."""
    if not name or looks_like_path(name) or Path(name).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_datasets(recipe: dict | None) -> list[str]:
    """Hub dataset ids among the recipe's train and eval sources (local files are left out)."""
    data = (recipe or {}).get("data") or {}
    found: list[str] = []
    for split in ("train", "eval"):
        for source in data.get(split) or []:
            path = source.get("path") if isinstance(source, dict) else source
            if isinstance(path, str) and is_hub_id(path) and path not in found:
                found.append(path)
    return found


def base_license(name: str | None, revision: str | None) -> str | None:
    """The base model's license from its own card, when that card is on this machine (local folder or Hub cache)."""
    if not name:
        return None
    readme: Path | None = None
    if is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "README.md", revision=revision)
        except Exception:  # a malformed cache entry only means the license stays unknown
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    elif Path(name).expanduser().is_dir():
        readme = Path(name).expanduser() / "README.md"
    if readme is None or not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        metadata = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    license_ = metadata.get("license") if isinstance(metadata, dict) else None
    return license_ if isinstance(license_, str) else None


def numeric_leaves(value: Any, prefix: str = "") -> dict[str, float]:
    """{'a.b': number} for every number in a nested report (booleans are not numbers here)."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(numeric_leaves(item, f"{prefix}{key}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix.rstrip(".")] = value
    return out


def split_eval_report(report: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(this model's numbers, the base model's numbers) from a lorakit eval report: its metrics.model and
    metrics.base (with --compare-base)."""
    metrics = report.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("model"), dict):
        base = metrics.get("base")
        return numeric_leaves(metrics["model"]), numeric_leaves(base if isinstance(base, dict) else {})
    return numeric_leaves(metrics if isinstance(metrics, dict) else report), {}


def eval_data_name(records: Records) -> str:
    """The data a lorakit eval report scored, as a Hub id or a file name (never a local path)."""
    report = records.evaluation or {}
    data = report.get("data")
    if isinstance(data, dict):
        data = data.get("path") or data.get("name") or data.get("description")
    if not isinstance(data, str) or not data:
        return "held-out data"
    head, sep, tail = data.partition(" (")  # "path (split)"
    if not is_hub_id(head) and (looks_like_path(head) or Path(head).exists()):
        return Path(head).name + sep + tail
    return data
