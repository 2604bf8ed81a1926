"""The model of `lorakit classify`: a pretrained model with a new head sized for the task, what of it trains, and
loading a finished classify run (or its merged folder) back for eval, predict and merge.

`AutoModelForSequenceClassification` puts the head on: decoder LLMs (Llama, Qwen, Mistral...) score the last
token that is not padding, encoders (BERT, ModernBERT...) their pooled first token. Every module the checkpoint
did not have (the new head, and parts of it such as a pooler or a dense layer before the output) is trained in
full and saved with the adapter (peft's `modules_to_save`); the rest is frozen, with LoRA on it unless the recipe
asks for the head alone (a linear probe).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

TASK_FILE = "lorakit_task.json"  # beside the adapter: the task and the head's config (labels, problem type, pad id)
AUTO_CLASS = "AutoModelForSequenceClassification"
# The heads' module names across transformers' sequence classifiers (decoders: score; encoders: classifier, with a
# pre_classifier or pooler in front in some).
HEAD_MODULES = ("score", "classifier", "pre_classifier", "pooler")


def load_classifier_tokenizer(model_section: dict):
    """The base's tokenizer with a pad token (the decoder head finds each row's last token by it).

    Unlike sft's, no chat template is added: a classifier reads plain text."""
    from transformers import AutoTokenizer

    from lorakit.models.loading import PAD_CANDIDATES, _load_error

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_section["name_or_path"], revision=model_section.get("revision"),
                                                  trust_remote_code=model_section.get("trust_remote_code", False))
    except (OSError, ValueError) as error:
        raise _load_error("tokenizer", model_section, error) from None
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((token for token in PAD_CANDIDATES if token in vocab), None) or tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise LorakitError(f"model.name_or_path: the tokenizer of {model_section['name_or_path']} has neither a pad "
                           "nor an end-of-sequence token, so batches cannot be padded")
    return tokenizer


# ---------------------------------------------------------------- the model for training


def load_classifier(recipe, placement, labels, tokenizer, *, gradient_checkpointing: bool = False) -> tuple[Any, list]:
    """(the base with its new head, the names of the modules the checkpoint did not have)."""
    from lorakit.models.loading import load_model

    quantization = head_unquantized(recipe.quantization)
    # A checkpoint that already is a classifier with another number of labels gets a new head of the right size.
    model, info = load_model(recipe.model, quantization, placement, gradient_checkpointing=gradient_checkpointing,
                             auto_class=AUTO_CLASS, output_loading_info=True, ignore_mismatched_sizes=True,
                             **labels.head_config(tokenizer.pad_token_id))
    new = [key for key in info["missing_keys"]] + [entry[0] if isinstance(entry, tuple) else entry
                                                   for entry in info.get("mismatched_keys") or []]
    return model, new_modules(model, set(new))


def head_unquantized(quantization: dict | None) -> dict | None:
    """The recipe's quantization with the head left out: it trains in full, so bitsandbytes must not quantize it
    (nor the parts in front of it in bigger heads)."""
    if quantization and "llm_int8_skip_modules" not in quantization:
        return {**quantization, "llm_int8_skip_modules": list(HEAD_MODULES)}
    return quantization


def new_modules(model, new_keys: set[str]) -> list[str]:
    """The outermost modules whose parameters are all new: `score`; `classifier` for RoBERTa's two-layer head."""
    parameters = {name for name, _ in model.named_parameters()}
    fresh = {key for key in new_keys if key in parameters}
    if not fresh:
        raise LorakitError("the model has no new head: AutoModelForSequenceClassification loaded every weight from "
                           "the checkpoint, so lorakit cannot tell which modules to train in full")
    modules = dict(model.named_modules())
    found = set()
    for key in fresh:
        name = key.rpartition(".")[0]
        while "." in name:
            parent = name.rpartition(".")[0]
            owned = {f"{parent}.{n}" for n, _ in modules[parent].named_parameters()}
            if not owned <= fresh:
                break
            name = parent
        found.add(name)
    return sorted(found)


def build_trainable_model(model, lora: dict, head: list[str], head_only: bool) -> Any:
    """peft's PeftModel: LoRA as the recipe's lora section says (or none for a linear probe) and the new head
    trained in full, saved with the adapter."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import DUMMY_TARGET_MODULES

    settings = {**lora, "task_type": "SEQ_CLS",
                "modules_to_save": sorted(set(lora.get("modules_to_save") or []) | set(head))}
    if head_only:
        # peft's placeholder for "adapt no layer": the adapter then holds the head alone.
        settings.update(target_modules=DUMMY_TARGET_MODULES, layers_to_transform=None)
    layers = settings.get("layers_to_transform")
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if layers is not None:
        wanted = [layers] if isinstance(layers, int) else list(layers)
        outside = [layer for layer in wanted if count is not None and not 0 <= layer < count]
        if outside:
            raise LorakitError(f"lora.layers_to_transform: the model has layers 0-{count - 1}; "
                               f"{', '.join(map(str, outside))} is not one of them (the top two: "
                               f"[{count - 2}, {count - 1}])")
        if settings.get("target_modules") == "all-linear":
            # peft takes layers_to_transform with a list of module names only: all-linear, within those layers.
            settings["target_modules"] = linear_module_names(model)
    try:
        config = LoraConfig(**settings)
    except ValueError as error:  # combinations peft refuses
        raise LorakitError(f"lora: {str(error).strip().splitlines()[0]}") from None
    return get_peft_model(model, config)


def linear_module_names(model) -> list[str]:
    """The names (q_proj, dense, ...) of the linear layers inside the model's numbered blocks."""
    import re

    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and re.search(r"\.\d+\.", name)})


def trainable_rows(model, head: list[str], head_only: bool) -> list[tuple[str, str]]:
    """Summary rows saying exactly what trains: the LoRA layers, the head, any other saved module."""
    import re

    from peft.tuners.lora import LoraLayer

    lora_modules = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)
                    and "modules_to_save" not in name]
    layers = sorted({int(m.group(1)) for name in lora_modules if (m := re.search(r"\.(\d+)\.", name))})
    kinds = sorted({name.rsplit(".", 1)[-1] for name in lora_modules})
    from peft.utils import ModulesToSaveWrapper

    saved = sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                   if isinstance(module, ModulesToSaveWrapper))
    head_text = ", ".join(f"{name} ({size_of(model, name):,} weights)" for name in head)
    rows = [("head", f"{head_text}: new, trained in full")]
    if head_only:
        rows.append(("trains", "the head only (a linear probe); the base model is frozen"))
    else:
        where = f"layers {layers[0]}-{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) \
            else ("layers " + ", ".join(map(str, layers)) if layers else "the whole model")
        rows.append(("trains", f"LoRA on {len(lora_modules)} modules in {where} ({', '.join(kinds)}) + the head; "
                               "the base weights are frozen"))
    others = [name for name in saved if name not in head]  # the recipe's own lora.modules_to_save
    if others:
        rows.append(("", "also trained in full (lora.modules_to_save): " + ", ".join(others)))
    return rows


def size_of(model, name: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if f".{name}." in f".{n}" and "original_module" not in n)


def weighted_loss(weights: list[float], kind: str):
    """Trainer's compute_loss_func for task.class_weights: balanced (cross-entropy, or BCE with pos_weight)."""
    import torch
    import torch.nn.functional as F

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        weight = torch.tensor(weights, device=logits.device)
        if kind == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weight)
        return F.cross_entropy(logits, labels, weight=weight)

    return loss


def save_classifier(trainer, tokenizer, task_record: dict, out: Path) -> None:
    """Adapter (LoRA + head, safetensors), tokenizer, and the task file that says how to rebuild the head."""
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / TASK_FILE).write_text(json.dumps(task_record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def task_record(labels, task: dict, pad_token_id: int | None) -> dict:
    return {"type": labels.type, "labels": labels.names, "text_column": task["text_column"],
            "text_pair_column": task.get("text_pair_column"), "label_column": task["label_column"],
            "head": labels.head_config(pad_token_id)}


# ---------------------------------------------------------------- a finished run, for eval, predict and merge


def read_task(folder: Path | None) -> dict | None:
    """The task file of a classify run or its merged folder; None for anything else."""
    if folder is None or not (Path(folder) / TASK_FILE).is_file():
        return None
    try:
        return json.loads((Path(folder) / TASK_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LorakitError(f"{Path(folder) / TASK_FILE} cannot be read: {error}") from None


def head_kwargs(task: dict | None) -> dict[str, Any]:
    """load_model's keyword arguments that put the run's head on the base; none for a causal LM run."""
    if task is None:
        return {}
    head = dict(task["head"])
    head["id2label"] = dict(enumerate(task["labels"])) if task["type"] != "regression" else {0: task["labels"][0]}
    head["label2id"] = {name: index for index, name in head["id2label"].items()}
    return {"auto_class": AUTO_CLASS, **head}


def load_classifier_target(target, placement, task: dict) -> Any:
    """The trained classifier in eval mode: base + head + adapter of a run, or a merged folder as it is."""
    from lorakit.models.inference import attach_adapter
    from lorakit.models.loading import load_model

    if target.adapter_path is not None:
        model = load_model(target.model_section, head_unquantized(target.quantization), placement, **head_kwargs(task))
        model = attach_adapter(model, target.adapter_path, target.model_section["name_or_path"])
    else:
        model = load_model(target.model_section, None, placement, auto_class=AUTO_CLASS)
    return model.eval()


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> list[dict]:
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length) if pairs is not None else \
        tokenizer(texts, truncation=True, max_length=max_length)
    return [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]


def predict_logits(model, tokenizer, rows: list[dict], batch_size: int, on_batch=None) -> Any:
    """Logits [rows, labels] of tokenized rows, batched longest first (little padding), in the rows' order."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    out = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = tokenizer.pad([rows[i] for i in chosen], return_tensors="pt")
        batch = {key: value.to(device) for key, value in batch.items() if key != "labels"}
        with torch.inference_mode():
            logits = model(**batch).logits.float().cpu()
        for row, index in enumerate(chosen):
            out[index] = logits[row]
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return torch.stack(out) if out else torch.zeros((0, 1))


# ---------------------------------------------------------------- merging a classify run (lorakit.models.merge)

# Texts the merge check scores: short, varied, and independent of any run's data.
CHECK_TEXTS = [
    "Return the sum of a list of numbers.",
    "The service was quick and the staff were friendly.",
    "I waited two hours and nobody answered my ticket.",
    "Open the file, read every line and close it again.",
    "Paris is the capital of France.",
    "Please reset my password; the link in the email does not work.",
]


def check_text_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in CHECK_TEXTS]


def classifier_skeleton(base_config, task: dict, trust_remote_code: bool = False) -> Any:
    """The run's classifier built from the base's config (on whatever device is current, e.g. meta): its head
    has the run's size, so the adapter's saved head is checked against the right shape."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(base_config)
    for key, value in head_kwargs(task).items():
        if key != "auto_class":
            setattr(config, key, value)
    return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- the model card's "How to use" (lorakit.hub.card)


def card_usage(adapter: bool, load_from: str, hub_base: str | None, revision: str | None) -> str:
    """How to load and run the classifier: plain peft on the base with the run's head, or the merged folder.
    `hub_base`: the base's Hub id, None when it was a local folder."""
    if adapter:
        pin = f', revision="{revision}"' if revision else ""
        where = f'"{hub_base}"{pin}' if hub_base else '"path/to/base-model"'  # a local base is not named
        local = Path(load_from).expanduser().is_dir()  # the card in the run folder itself, not yet on the Hub
        task_file = f'"{Path(load_from) / TASK_FILE}"' if local else f'hf_hub_download("{load_from}", "{TASK_FILE}")'
        lines = ["import json", "", *([] if local else ["from huggingface_hub import hf_hub_download"]),
                 "from peft import PeftModel", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                 "", f"task = json.load(open({task_file}))  # the labels and the head's config",
                 f"base = AutoModelForSequenceClassification.from_pretrained({where}, **task[\"head\"])",
                 f'model = PeftModel.from_pretrained(base, "{load_from}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{load_from}")', "",
                 'logits = model(**tokenizer("Text to label", return_tensors="pt")).logits',
                 'print(task["labels"][logits.argmax(-1).item()])']
    else:
        lines = ["from transformers import pipeline", "",
                 f'classify = pipeline("text-classification", model="{load_from}")',
                 'print(classify("Text to label"))  # [{"label": ..., "score": ...}]']
    return "```python\n" + "\n".join(lines) + "\n```\n"
