"""The model card (README.md) of a run or merged folder, and the one `lorakit push` uploads: Hub metadata in YAML,
then a body. One builder for both kinds; the kind only changes the wording and the loading code.

The metadata follows the Hub's model card conventions (base_model by Hub id, never a local path; library_name,
pipeline_tag, tags, datasets, license, model-index); the body tells how to load and use the model, how it was
trained (the recipe, secrets removed), on what data (with fingerprints) and with what results, with the loss plot.
Everything comes from the folder's own files and nothing from the network, so `lorakit push --dry-run` shows the
very card a push uploads. A run writes this card into its folder (write_card) in place of the one trl writes;
the card ends with lorakit's mark, so push can tell it from a card a person wrote (card_origin).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.hub.records import (  # noqa: F401
    EVAL_FILE,
    MERGE_FILE,
    Records,
    base_license,
    base_model,
    eval_data_name,
    hub_datasets,
    is_hub_id,
    numeric_leaves,
    read_json,
    read_recipe,
    read_records,
    split_eval_report,
)
from lorakit.recipe.sections import redact
from lorakit.training.run_dir import RECIPE_FILE

ADAPTER, MERGED = "adapter", "merged"
MAX_TABLE_ROWS = 40  # a report with more numbers than this is summarised, the full file is in the repo
CARD_MARK = "<!-- lorakit model card; sha256 of the text above: "
LORAKIT, LIBRARY, USER = "lorakit", "library", "user"  # who wrote a README.md
# What the cards peft and trl write by themselves say: peft's placeholder, trl's template.
LIBRARY_CARD_SIGNS = ("[More Information Needed]", "This model is a fine-tuned version of [", "It has been trained using [TRL]")
PIPELINE_TAGS = {"classify": "text-classification"}
METHODS = {"sft": "supervised fine-tuning (trl `SFTTrainer`)", "dpo": "preference optimization (trl `DPOTrainer`)",
           "classify": "a classification head (transformers `Trainer`)"}
# Leaves of an eval report that describe the run rather than score the model; kept out of model-index.
BOOKKEEPING = ("rows", "count", "examples", "samples", "replies", "seconds", "runtime", "tokens", "batch_size",
               "seed", "max_new_tokens", "per_second")


def show(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------- whose card a README.md is


def stamp(text: str) -> str:
    """The card with lorakit's mark as its last line: the sha256 of everything above it, so a card lorakit wrote
    and nobody edited since is told apart from one a person wrote or edited."""
    return f"{text.rstrip()}\n\n{CARD_MARK}{hashlib.sha256(text.rstrip().encode()).hexdigest()} -->\n"


def card_origin(text: str) -> str:
    """LORAKIT (lorakit's card, unedited), LIBRARY (a card peft or trl writes by themselves) or USER."""
    body, _, last = text.rstrip().rpartition("\n")
    if last.startswith(CARD_MARK):
        digest = last[len(CARD_MARK):].removesuffix("-->").strip()
        return LORAKIT if hashlib.sha256(body.rstrip().encode()).hexdigest() == digest else USER
    if any(sign in text for sign in LIBRARY_CARD_SIGNS):
        return LIBRARY
    return USER


def write_card(folder: Path, kind: str = ADAPTER) -> Path:
    """lorakit's card as the folder's README.md, in place of the card trl writes with every checkpoint and
    peft's placeholder (never over a card a person wrote)."""
    target = folder / "README.md"
    if target.is_file() and card_origin(target.read_text(encoding="utf-8", errors="replace")) == USER:
        return target
    partial = folder / ".README.md.partial"
    partial.write_text(build_card(folder, kind), encoding="utf-8")
    os.replace(partial, target)
    return target


# ---------------------------------------------------------------- the card


def build_card(folder: Path, kind: str, repo_id: str | None = None, records: Records | None = None) -> str:
    """README.md for the folder's model (an adapter run or a merged model: one card, the kind decides its
    wording). With `repo_id`, as it will be uploaded there; without, for the folder itself (its usage code then
    loads from the folder)."""
    records = records or read_records(folder)
    card = Card(folder=folder, kind=kind, name=repo_id.split("/")[-1] if repo_id else folder.name,
                load_from=repo_id or str(folder), records=records)
    return stamp(f"---\n{card.metadata()}---\n\n{card.body()}")


@dataclass
class Card:
    folder: Path
    kind: str  # ADAPTER or MERGED
    name: str  # the card's title and model-index name
    load_from: str  # what the usage code loads: the Hub repo, or the folder
    records: Records

    @property
    def recipe(self) -> dict:
        return self.records.recipe or {}

    @property
    def command(self) -> str:
        return str((self.records.record or {}).get("command") or "sft")

    @property
    def stages(self) -> list[dict]:
        """Each training stage that made the adapter (a DPO run on an SFT run: sft, then dpo)."""
        return (self.records.record or {}).get("stages") or [{"command": self.command}]

    def metadata(self) -> str:
        from huggingface_hub import EvalResult, ModelCardData

        base, revision = base_model(self.records)
        quantization = self.recipe.get("quantization") or {}
        tags = ["lorakit", "trl", *dict.fromkeys(s.get("command") for s in self.stages), "lora"]
        tags += ["qlora"] if quantization.get("load_in_4bit") else []
        fields: dict[str, Any] = {"library_name": "peft" if self.kind == ADAPTER else "transformers",
                                  "pipeline_tag": PIPELINE_TAGS.get(self.command, "text-generation"), "tags": tags}
        if is_hub_id(base):
            fields["base_model"] = base
            fields["base_model_relation"] = "adapter" if self.kind == ADAPTER else "finetune"
        datasets = hub_datasets(self.recipe)
        datasets += [d for s in self.stages for d in s.get("datasets") or [] if is_hub_id(d) and d not in datasets]
        if datasets:
            fields["datasets"] = datasets
        license_ = base_license(base, revision)
        if license_:
            fields["license"] = license_
        if self.records.evaluation:
            ours, _ = split_eval_report(self.records.evaluation)
            data_name = eval_data_name(self.records)
            results = [EvalResult(task_type=fields["pipeline_tag"], dataset_type=data_name, dataset_name=data_name,
                                  metric_type=key, metric_value=value)
                       for key, value in ours.items() if not key.split(".")[-1].endswith(BOOKKEEPING)]
            if results:
                fields["model_name"] = self.name
                fields["eval_results"] = results[:MAX_TABLE_ROWS]
        return ModelCardData(**fields).to_yaml() + "\n"

    def body(self) -> str:
        base, _ = base_model(self.records)
        what = "LoRA adapter" if self.kind == ADAPTER else "model (LoRA adapter merged into its base)"
        on = f"[`{base}`](https://huggingface.co/{base})" if is_hub_id(base) else ("a local base model" if base
                                                                                  else "its base model")
        how = ", then ".join(METHODS.get(s.get("command"), METHODS["sft"]) for s in self.stages)
        parts = [f"# {self.name}\n", f"A {what} fine-tuned from {on} with {how}, made with lorakit.\n",
                 "## How to use\n", self.usage(), "## Training\n", self.training_facts()]
        if self.recipe:
            text = yaml.safe_dump(redact(self.recipe), sort_keys=False, allow_unicode=True)
            where = f"`{RECIPE_FILE}` beside this card" if (self.folder / RECIPE_FILE).is_file() else "of the training run"
            parts.append(f"The resolved recipe ({where}, secrets removed); `lorakit {self.command}` re-runs it where "
                         f"its data paths exist:\n\n```yaml\n{text}```\n")
        data = data_section(self.records.record)
        if data:
            parts += ["## Data\n", data]
        parts += results_section(self.folder, self.records)
        versions = (self.records.record or {}).get("versions") or {}
        if versions:
            parts += ["## Framework versions\n", "".join(f"- {name}: {version}\n" for name, version in versions.items())]
        return "\n".join(parts)

    def usage(self) -> str:
        base, revision = base_model(self.records)
        from lorakit.models.classifier import TASK_FILE, card_usage

        if (self.folder / TASK_FILE).is_file():  # a classifier: base + its head + adapter, or the merged pipeline
            return card_usage(self.kind == ADAPTER, self.load_from, base if is_hub_id(base) else None, revision)
        chat = has_chat_template(self.folder)
        lines = ["```python"]
        if self.kind == ADAPTER:
            lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
            if is_hub_id(base):
                pin = f', revision="{revision}"' if revision else ""
                lines.append(f'base = AutoModelForCausalLM.from_pretrained("{base}"{pin}, dtype="auto")')
            else:
                lines.append('base = AutoModelForCausalLM.from_pretrained("path/to/base-model", dtype="auto")  '
                             "# the local base this adapter was trained on")
            lines.append(f'model = PeftModel.from_pretrained(base, "{self.load_from}")')
        else:
            lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                      f'model = AutoModelForCausalLM.from_pretrained("{self.load_from}", dtype="auto")']
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{self.load_from}")'
                     + ("  # with the chat template of training" if chat else ""))
        lines.append("")
        if chat:
            lines += ['messages = [{"role": "user", "content": "Hello!"}]',
                      "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                      'return_tensors="pt")']
        else:
            lines.append('inputs = tokenizer("Hello!", return_tensors="pt")')
        lines += ["output = model.generate(**inputs, max_new_tokens=128)",
                  'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```",
                  ""]
        notes = []
        if self.kind == ADAPTER and (self.recipe.get("quantization") or {}).get("load_in_4bit"):
            notes.append("The adapter was trained on the base loaded in 4-bit (QLoRA); it also applies to the base "
                         "in 16-bit, as above, or pass the recipe's `quantization` section as a `BitsAndBytesConfig` "
                         "to load the base the way it was trained.")
        if self.kind == ADAPTER and not is_hub_id(base):
            notes.append("The base model was a local folder, not a Hub model, so it is not named in the metadata: "
                         "load it from where you have it.")
        return "\n".join(lines) + "".join(f"\n{note}\n" for note in notes)

    def training_facts(self) -> str:
        base, revision = base_model(self.records)
        record, lora = self.records.record or {}, self.recipe.get("lora") or {}
        facts = []
        if is_hub_id(base):
            facts.append(f"- **Base model:** `{base}` at revision `{revision}`" if revision
                         else f"- **Base model:** `{base}` (revision not pinned: the default branch at training time)")
        elif base:
            facts.append(f"- **Base model:** a local model folder (`{Path(base).name}`), not on the Hub")
        settings = [f"{key.replace('lora_', '')}={lora[key]}" for key in ("r", "lora_alpha", "lora_dropout")
                    if lora.get(key) is not None]
        if lora.get("target_modules") is not None:
            settings.append(f"target modules {lora['target_modules']}")
        if settings:
            facts.append("- **LoRA:** " + ", ".join(settings))
        quantization = self.recipe.get("quantization") or {}
        if quantization.get("load_in_4bit"):
            facts.append(f"- **Quantization:** base in 4-bit {quantization.get('bnb_4bit_quant_type') or 'nf4'} "
                         "(QLoRA)")
        elif quantization.get("load_in_8bit"):
            facts.append("- **Quantization:** base in 8-bit")
        parameters = record.get("parameters") or {}
        if parameters.get("trainable") and parameters.get("total"):
            share = 100 * parameters["trainable"] / parameters["total"]
            facts.append(f"- **Trainable parameters:** {parameters['trainable']:,} of {parameters['total']:,} "
                         f"({share:.2f}%)")
        device = record.get("device") or {}
        hardware = ", ".join(str(device[key]) for key in ("name", "dtype") if device.get(key))
        if hardware:
            facts.append(f"- **Hardware:** {hardware}")
        if record.get("train_seconds") is not None:
            facts.append(f"- **Training time:** {show(record['train_seconds'])} s")
        if self.kind == MERGED:
            facts.append("- **Merged:** the LoRA weights were added into the base weights, so the model loads "
                         "without peft")
        return "\n".join(facts) + "\n"


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


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


def results_section(folder: Path, records: Records) -> list[str]:
    from lorakit.training.plots import PLOT_FILE
    from lorakit.training.progress import logged_windows, steps_text

    parts = []
    record = records.record or {}
    metrics = numeric_leaves(record.get("metrics") or {})
    windows = logged_windows(record.get("log_history") or [])
    if metrics or windows:
        rows = [(key, show(value)) for key, value in metrics.items()]
        if len(windows) > 1:  # the mean loss of the first and last logging windows, not one window twice
            (a, b, first), (c, d, last) = windows[0], windows[-1]
            rows.insert(0, ("loss, first to last logged window",
                            f"{show(first)} ({steps_text(a, b)}) → {show(last)} ({steps_text(c, d)})"))
        parts += ["### Training\n", table(["metric", "value"], rows)]
    if (folder / PLOT_FILE).is_file():
        parts.append(f"![Training and eval loss, and the learning rate, against the optimizer step]({PLOT_FILE})\n")
    if records.evaluation:
        ours, base = split_eval_report(records.evaluation)
        heading = f"### Evaluation (`lorakit eval` on {eval_data_name(records)})\n"
        if ours and base:
            parts += [heading, table(["metric", "this model", "base model"],
                                     [(key, show(value), show(base[key]) if key in base else "")
                                      for key, value in ours.items()])]
        elif ours:
            parts += [heading, table(["metric", "value"], [(key, show(value)) for key, value in ours.items()])]
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
