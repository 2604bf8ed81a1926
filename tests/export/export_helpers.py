"""Helpers of the export tests: tiny models with real chat templates and special tokens, the converter's
availability, and an independent renderer of the Go-template subset lorakit writes into Modelfiles."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import corpus_lines

TRL_TEMPLATES = None


def trl_template(name: str) -> str:
    """A verbatim chat template as trl ships it (trl/chat_templates/NAME.jinja)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


# family -> (template, special tokens, bos, eos, pad, end-of-turn, adds BOS)
FAMILIES = {
    "llama3": ("llama3_2", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|eot_id|>", True),
    "qwen2": ("qwen2_5", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
              "<|im_end|>", False),
}


def family_tokenizer(folder: Path, family: str):
    """A byte-level BPE tokenizer trained on the test corpus, with the family's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, bos, eos, pad, _, adds_bos = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)])
    fast.chat_template = trl_template(template)
    fast.save_pretrained(folder)
    return fast


def family_model(folder: Path, family: str) -> Path:
    """A tiny random Llama (llama3) or Qwen2 (qwen2) with the family's tokenizer, template and stop tokens."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = family_tokenizer(folder, family)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if family == "llama3"
             else Qwen2ForCausalLM(Qwen2Config(**common)))
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
             if t in tokenizer.get_vocab()] or [tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- llama.cpp's converter


def converter_folder() -> Path | None:
    named = os.environ.get("LORAKIT_LLAMA_CPP")
    if not named:
        return None
    root = Path(named)
    for folder in (root, root / "vendor" / "llama.cpp", *root.glob("llama_cpp_python-*/vendor/llama.cpp")):
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    return None


needs_converter = pytest.mark.skipif(
    converter_folder() is None,
    reason="llama.cpp's converter is not here: set LORAKIT_LLAMA_CPP to a llama.cpp source folder (.ci/run does)")


def gguf_fields(file: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))}


def read_record(folder: Path) -> dict:
    return json.loads((folder / "lorakit_export.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- Go templates (the subset Modelfiles use)

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def parse_go(template: str) -> list:
    """Go template text -> nested nodes: ("text", s), ("field", name), ("if", [(cond, body)...], else_body),
    ("range", field, body). Trim markers ({{- -}}) remove the whitespace beside them, as in Go."""
    parts, position = [], 0
    for match in ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip()
        if parts and parts[-1][0] == "trim-next":
            parts.pop()
            text = text.lstrip()
        parts.append(("text", text))
        parts.append(("action", match.group(2)))
        if match.group(3):
            parts.append(("trim-next", ""))
        position = match.end()
    tail = template[position:]
    if parts and parts[-1][0] == "trim-next":
        parts.pop()
        tail = tail.lstrip()
    parts.append(("text", tail))
    nodes, rest = build(parts, 0)
    assert rest == len(parts), "unbalanced template"
    return nodes


def build(parts: list, index: int) -> tuple[list, int]:
    nodes = []
    while index < len(parts):
        kind, value = parts[index]
        if kind == "text":
            nodes.append(("text", value))
            index += 1
            continue
        if value == "end" or value == "else" or value.startswith("else if "):
            return nodes, index
        if value.startswith("if "):
            branches, else_body = [], []
            condition = value[3:]
            while True:
                body, index = build(parts, index + 1)
                branches.append((condition, body))
                word = parts[index][1]
                if word.startswith("else if "):
                    condition = word[8:]
                    continue
                if word == "else":
                    else_body, index = build(parts, index + 1)
                break
            assert parts[index][1] == "end"
            nodes.append(("if", branches, else_body))
            index += 1
        elif value.startswith("range "):
            body, index = build(parts, index + 1)
            assert parts[index][1] == "end"
            nodes.append(("range", value[6:], body))
            index += 1
        elif re.fullmatch(r"\.\w+", value):
            nodes.append(("field", value[1:]))
            index += 1
        else:
            raise AssertionError(f"action outside the tested subset: {value}")
    return nodes, index


def evaluate(condition: str, scope: dict) -> bool:
    match = re.fullmatch(r'eq \.(\w+) "(.*)"', condition)
    if match:
        return scope.get(match.group(1)) == match.group(2)
    match = re.fullmatch(r"\.(\w+)", condition)
    if match:
        return bool(scope.get(match.group(1)))
    raise AssertionError(f"condition outside the tested subset: {condition}")


def execute(nodes: list, scope: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(scope[node[1]]))
        elif node[0] == "if":
            for condition, body in node[1]:
                if evaluate(condition, scope):
                    out.append(execute(body, scope))
                    break
            else:
                out.append(execute(node[2], scope))
        elif node[0] == "range":
            for item in scope[node[1].lstrip(".")]:
                out.append(execute(node[2], {**scope, **item}))
    return "".join(out)


def ollama_render(template: str, messages: list[dict], default_system: str | None) -> str:
    """What Ollama renders: the Modelfile's SYSTEM when the conversation has no system message; .System is every
    system message joined by a blank line; .Messages holds Role/Content of each message."""
    if default_system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    scope = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return execute(parse_go(template), scope)


def read_modelfile(path: Path) -> dict:
    """FROM, TEMPLATE, SYSTEM and the stop parameters of a Modelfile lorakit wrote."""
    text = path.read_text(encoding="utf-8")
    found = {"stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}
    for key in ("TEMPLATE", "SYSTEM"):
        match = re.search(rf'^{key} """(.*?)"""$', text, re.M | re.S)
        found[key] = match.group(1) if match else None
    found["FROM"] = re.search(r"^FROM (.*)$", text, re.M).group(1)
    return found
