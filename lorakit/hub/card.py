"""The model card (README.md) that `lorakit push` uploads: Hub metadata in YAML, then a body.

The metadata follows the Hub's model card conventions (base_model, library_name, pipeline_tag, tags, datasets,
license, model-index); the body tells how to load and use the model, how it was trained (the recipe, secrets
removed), on what data (with fingerprints) and with what results. Everything comes from the folder's own files
and nothing from the network, so `lorakit push --dry-run` shows the very card a push uploads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import LorakitError
from lorakit.recipe.sections import looks_like_path, redact
from lorakit.training.run_dir import RECIPE_FILE, RECORD_FILE

MERGE_FILE = "lorakit_merge.json"
EVAL_FILE = "lorakit_eval.json"
ADAPTER, MERGED = "adapter", "merged"
MAX_TABLE_ROWS = 40  # a report with more numbers than this is summarised, the full file is in the repo
# Leaves of an eval report that describe the run rather than score the model; kept out of model-index.
BOOKKEEPING = ("rows", "count", "examples", "samples", "replies", "seconds", "runtime", "tokens", "batch_size",
               "seed", "max_new_tokens", "per_second")


@dataclass
class Records:
    """What a run or merged folder says about itself; each is None when its file is absent."""

    recipe: dict | None
    record: dict | None
    merge: dict | None
    evaluation: dict | None
    adapter_config: dict | None


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LorakitError(f"{path} cannot be read as JSON ({error}); fix or remove it, then push again") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{path} must hold a JSON object; fix or remove it, then push again")
    return value


def read_recipe(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise LorakitError(f"{path} cannot be read as YAML ({error}); fix or remove it, then push again") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{path} must be a recipe (a mapping of sections); fix or remove it, then push again")
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


# ---------------------------------------------------------------- facts the card states


def base_model(records: Records) -> tuple[str | None, str | None]:
    """(name_or_path, revision) of the base model, from the recipe first, then the records, then peft's config."""
    candidates = [
        ((records.recipe or {}).get("model") or {}),
        ((records.record or {}).get("base_model") or {}),
        ((records.merge or {}).get("base_model") or {}),
    ]
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


def show(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------- the card


def build_card(folder: Path, kind: str, repo_id: str, records: Records | None = None) -> str:
    """README.md text for the folder's model, as it will be uploaded to `repo_id`."""
    records = records or read_records(folder)
    metadata = card_metadata(kind, repo_id, records)
    return f"---\n{metadata}---\n\n{card_body(folder, kind, repo_id, records)}"


def card_metadata(kind: str, repo_id: str, records: Records) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    base, revision = base_model(records)
    recipe = records.recipe or {}
    quantization = recipe.get("quantization") or {}
    tags = ["lorakit", "trl", "sft", "lora"] + (["qlora"] if quantization.get("load_in_4bit") else [])
    fields: dict[str, Any] = {
        "library_name": "peft" if kind == ADAPTER else "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if is_hub_id(base):
        fields["base_model"] = base
        fields["base_model_relation"] = "adapter" if kind == ADAPTER else "finetune"
    datasets = hub_datasets(recipe)
    if datasets:
        fields["datasets"] = datasets
    license_ = base_license(base, revision)
    if license_:
        fields["license"] = license_
    if records.evaluation:
        ours, _ = split_eval_report(records.evaluation)
        data_name = eval_data_name(records)
        results = [EvalResult(task_type="text-generation", dataset_type=data_name, dataset_name=data_name,
                              metric_type=key, metric_value=value)
                   for key, value in ours.items() if not key.split(".")[-1].endswith(BOOKKEEPING)]
        if results:
            fields["model_name"] = repo_id.split("/")[-1]
            fields["eval_results"] = results[:MAX_TABLE_ROWS]
    return ModelCardData(**fields).to_yaml() + "\n"


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


def card_body(folder: Path, kind: str, repo_id: str, records: Records) -> str:
    base, revision = base_model(records)
    recipe = records.recipe or {}
    lora = recipe.get("lora") or {}
    what = "LoRA adapter" if kind == ADAPTER else "model (LoRA adapter merged into its base)"
    on = f"[`{base}`](https://huggingface.co/{base})" if is_hub_id(base) else ("a local base model" if base
                                                                              else "its base model")
    parts = [f"# {repo_id.split('/')[-1]}\n",
             f"A {what} fine-tuned from {on} with supervised fine-tuning (trl `SFTTrainer`), made with lorakit.\n",
             "## How to use\n", usage(kind, repo_id, base, revision, recipe, has_chat_template(folder)),
             "## Training\n", training_facts(kind, base, revision, recipe, lora, records)]
    if recipe:
        text = yaml.safe_dump(redact(recipe), sort_keys=False, allow_unicode=True)
        where = f"`{RECIPE_FILE}` in this repo" if (folder / RECIPE_FILE).is_file() else "of the training run"
        parts.append(f"The resolved recipe ({where}, secrets removed); `lorakit sft` re-runs it where its data "
                     f"paths exist:\n\n```yaml\n{text}```\n")
    data = data_section(records.record)
    if data:
        parts += ["## Data\n", data]
    parts += results_section(records)
    versions = (records.record or {}).get("versions") or {}
    if versions:
        parts += ["## Framework versions\n", "".join(f"- {name}: {version}\n" for name, version in versions.items())]
    return "\n".join(parts)


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def usage(kind: str, repo_id: str, base: str | None, revision: str | None, recipe: dict, chat: bool) -> str:
    lines = ["```python"]
    if kind == ADAPTER:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
        if is_hub_id(base):
            pin = f', revision="{revision}"' if revision else ""
            lines.append(f'base = AutoModelForCausalLM.from_pretrained("{base}"{pin}, dtype="auto")')
        else:
            lines.append('base = AutoModelForCausalLM.from_pretrained("path/to/base-model", dtype="auto")  '
                         "# the local base this adapter was trained on")
        lines.append(f'model = PeftModel.from_pretrained(base, "{repo_id}")')
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")']
    lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")' + ("  # with the chat template of training"
                                                                            if chat else ""))
    lines.append("")
    if chat:
        lines += ['messages = [{"role": "user", "content": "Hello!"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                  'return_tensors="pt")']
    else:
        lines.append('inputs = tokenizer("Hello!", return_tensors="pt")')
    lines += ["output = model.generate(**inputs, max_new_tokens=128)",
              'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    notes = []
    if kind == ADAPTER and (recipe.get("quantization") or {}).get("load_in_4bit"):
        notes.append("The adapter was trained on the base loaded in 4-bit (QLoRA); it also applies to the base in "
                     "16-bit, as above, or pass the recipe's `quantization` section as a `BitsAndBytesConfig` to load "
                     "the base the way it was trained.")
    if kind == ADAPTER and not is_hub_id(base):
        notes.append("The base model was a local folder, not a Hub model, so it is not named in the metadata: load it "
                     "from where you have it.")
    return "\n".join(lines) + "".join(f"\n{note}\n" for note in notes)


def training_facts(kind: str, base: str | None, revision: str | None, recipe: dict, lora: dict,
                   records: Records) -> str:
    record = records.record or {}
    facts = []
    if is_hub_id(base):
        facts.append(f"- **Base model:** `{base}` at revision `{revision}`" if revision
                     else f"- **Base model:** `{base}` (revision not pinned: the default branch at training time)")
    elif base:
        facts.append(f"- **Base model:** a local model folder (`{Path(base).name}`), not on the Hub")
    if lora:
        facts.append(f"- **LoRA:** r={lora.get('r')}, alpha={lora.get('lora_alpha')}, "
                     f"dropout={lora.get('lora_dropout')}, target modules {lora.get('target_modules')}")
    quantization = recipe.get("quantization") or {}
    if quantization.get("load_in_4bit"):
        facts.append(f"- **Quantization:** base in 4-bit {quantization.get('bnb_4bit_quant_type', 'nf4')} (QLoRA)")
    elif quantization.get("load_in_8bit"):
        facts.append("- **Quantization:** base in 8-bit")
    parameters = record.get("parameters") or {}
    if parameters.get("trainable") and parameters.get("total"):
        share = 100 * parameters["trainable"] / parameters["total"]
        facts.append(f"- **Trainable parameters:** {parameters['trainable']:,} of {parameters['total']:,} "
                     f"({share:.2f}%)")
    device = record.get("device") or {}
    if device:
        facts.append(f"- **Hardware:** {device.get('name')}, {device.get('dtype')}")
    if record.get("train_seconds") is not None:
        facts.append(f"- **Training time:** {show(record['train_seconds'])} s")
    if kind == MERGED:
        facts.append("- **Merged:** the LoRA weights were added into the base weights, so the model loads "
                     "without peft")
    return "\n".join(facts) + "\n"


def data_section(record: dict | None) -> str:
    splits = (record or {}).get("data") or {}
    rows, totals = [], []
    for split, report in splits.items():
        if not isinstance(report, dict):
            continue
        totals.append(f"- {split}: {show(report.get('rows'))} rows, {show(report.get('tokens'))} tokens "
                      f"({show(report.get('trained_tokens'))} trained on)")
        for source in report.get("sources") or []:
            rows.append((split, str(source.get("name")), str(source.get("format")),
                         f"{show(source.get('used_rows'))} of {show(source.get('rows'))}",
                         f"`{source.get('fingerprint')}`"))
    if not rows and not totals:
        return ""
    return table(["split", "source", "format", "rows used", "fingerprint"], rows) + "\n" + "\n".join(totals) + "\n"


def results_section(records: Records) -> list[str]:
    parts = []
    record = records.record or {}
    metrics = numeric_leaves(record.get("metrics") or {})
    losses = [entry["loss"] for entry in record.get("log_history") or [] if isinstance(entry.get("loss"), (int, float))]
    if metrics or losses:
        rows = [(key, show(value)) for key, value in metrics.items()]
        if losses:
            rows.insert(0, ("loss, first to last logged step", f"{show(losses[0])} → {show(losses[-1])}"))
        parts += ["### Training\n", table(["metric", "value"], rows)]
    if records.evaluation:
        ours, base = split_eval_report(records.evaluation)
        if ours and base:
            rows = [(key, show(value), show(base[key]) if key in base else "") for key, value in ours.items()]
            parts += [f"### Evaluation (`lorakit eval` on {eval_data_name(records)})\n",
                      table(["metric", "this model", "base model"], rows)]
        elif ours:
            parts += [f"### Evaluation (`lorakit eval` on {eval_data_name(records)})\n",
                      table(["metric", "value"], [(key, show(value)) for key, value in ours.items()])]
    merge = records.merge or {}
    figures = {**numeric_leaves(merge.get("check") or {}),
               **numeric_leaves(merge.get("vs_training_model") or {}, "against the 4-bit training model: ")}
    if merge and not figures:
        figures = numeric_leaves(merge)
    if figures:
        parts += ["### Merge check\n", "The merged model's logits against base + adapter on fixed prompts "
                  "(`lorakit_merge.json`):\n\n" + table(["figure", "value"],
                                                          [(key, show(value)) for key, value in figures.items()])]
    return ["## Results\n", *parts] if parts else []


def table(header: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows[:MAX_TABLE_ROWS]]
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"\n({len(rows) - MAX_TABLE_ROWS} more in the file)")
    return "\n".join(lines) + "\n"
