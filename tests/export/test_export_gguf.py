"""lorakit export --to gguf / ollama on tiny Llama-3 and Qwen2.5 style runs: the GGUF answers like the fine-tuned
model (checked here with plain transformers and peft, independently of lorakit's own check), its metadata holds
the chat template and stop tokens, and the Modelfile renders what training rendered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import facts_rows, fast_training, write_jsonl
from export_helpers import FAMILIES, family_model, gguf_fields, needs_converter, ollama_render, read_modelfile, \
    read_record

from lorakit.cli import main

pytestmark = [pytest.mark.slow, needs_converter]
QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What do bees make?"}]


def train_run(folder: Path, base: Path, extra: str = "", steps: int = 12) -> Path:
    """A real `lorakit sft` run on the facts, long enough for the tiny model to learn its answers."""
    from lorakit.commands.sft import run_sft

    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "facts.jsonl", facts_rows("messages"))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {base}\n{extra}data:\n  train:\n    - path: {data}\n"
                      + fast_training(folder / "run", steps), encoding="utf-8")
    return run_sft(str(recipe))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    found = {}
    for family in FAMILIES:
        base = family_model(tmp_path_factory.mktemp(f"{family}-base"), family)
        found[family] = (base, train_run(tmp_path_factory.mktemp(family), base))
    return found


def export(*args) -> object:
    return CliRunner().invoke(main, ["export", *map(str, args)])


def fine_tuned_answer(base: Path, run: Path, ids: list[int], stops: list[int]):
    """(logits on the prompt, greedy reply) of base + adapter, with plain transformers and peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run).eval()
    return answer(model, ids, stops)


def answer(model, ids: list[int], stops: list[int]):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        reply = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=12, do_sample=False, eos_token_id=stops,
                               pad_token_id=stops[0])[0, len(ids):].tolist()
    return logits, reply


@pytest.mark.parametrize("family, quant, to", [("llama3", "f16", "ollama"), ("llama3", "q8_0", "gguf"),
                                               ("qwen2", "f16", "gguf"), ("qwen2", "q8_0", "ollama")])
def test_the_export_answers_like_the_fine_tuned_model(runs, family, quant, to, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, run = runs[family]
    out = tmp_path / "export"
    result = export(run, "--to", to, "--quant", quant, "--output", out)
    assert result.exit_code == 0, result.output
    record = read_record(out)
    assert record["verified"] is True and record["check"]["passed"]
    assert not list(tmp_path.glob(".export.partial-*"))
    file = out / record["gguf"]["file"]
    assert file.suffix == ".gguf" and file.is_file()

    tokenizer = AutoTokenizer.from_pretrained(run)
    _, _, bos, eos, pad, end_of_turn, adds_bos = FAMILIES[family]
    fields = gguf_fields(file)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids(eos)
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids(end_of_turn)
    assert fields["tokenizer.ggml.add_bos_token"] is adds_bos
    assert fields["general.name"] == run.name

    # Independently of lorakit's check: the GGUF read by transformers against base + adapter through peft.
    stops = json.loads((out / "lorakit_export.json").read_text())["stop_tokens"]
    stop_ids = [entry["id"] for entry in stops]
    assert tokenizer.convert_tokens_to_ids(end_of_turn) in stop_ids
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
    expected_logits, expected_reply = fine_tuned_answer(base, run, ids, stop_ids)
    gguf_model = AutoModelForCausalLM.from_pretrained(out, gguf_file=file.name, dtype=torch.float32).eval()
    logits, reply = answer(gguf_model, ids, stop_ids)
    assert reply == expected_reply  # the same greedy reply, on a question like those the run learned,
    assert len(reply) < 12  # which ends, as the run learned, on the end-of-turn token
    difference = (logits - expected_logits).abs().max().item()
    if quant == "f16":  # f16 weights: the rounding of a half-precision copy, relative to the largest logit
        assert difference <= 2e-2 * max(1.0, expected_logits.abs().max().item())
    else:  # q8_0 changes the weights on purpose, but not which token comes next
        agreement = (logits.argmax(-1) == expected_logits.argmax(-1)).float().mean().item()
        assert agreement >= 0.9, agreement

    if to == "ollama":
        modelfile = read_modelfile(out / "Modelfile")
        assert (out / modelfile["FROM"]).resolve() == file.resolve()
        assert end_of_turn in modelfile["stop"]
        assert modelfile["SYSTEM"] == "Answer briefly."  # every training conversation used it
        conversation = [*QUESTION, {"role": "assistant", "content": "Bees make honey."},
                        {"role": "user", "content": "Where do fish live?"}]
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        rendered = ollama_render(modelfile["TEMPLATE"], conversation, modelfile["SYSTEM"])
        assert (bos if adds_bos else "") + rendered == expected
        without_system = ollama_render(modelfile["TEMPLATE"], conversation[1:], modelfile["SYSTEM"])
        assert without_system == rendered  # Ollama's SYSTEM stands in for the trained system prompt
        assert record["commands"][0].startswith("ollama create ")


def test_a_qlora_run_exports_from_the_full_precision_base(tiny_llama, tmp_path):
    run = train_run(tmp_path / "qlora", tiny_llama, "quantization:\n  load_in_4bit: true\n", steps=3)
    out = tmp_path / "qlora-gguf"
    result = export(run, "--to", "gguf", "--output", out)
    assert result.exit_code == 0, result.output
    record = read_record(out)
    assert record["verified"] is True
    assert record["source"]["trained_with_quantization"]["load_in_4bit"] is True
    assert record["source"]["reference_dtype"] == "float32"
    assert any("full precision" in note for note in record["notes"])
    assert gguf_fields(out / record["gguf"]["file"])["general.file_type"] == 1  # MOSTLY_F16


def test_a_lora_gguf_holds_every_adapted_module(runs, tmp_path):
    _, run = runs["qwen2"]
    out = tmp_path / "lora"
    result = export(run, "--to", "gguf", "--adapter-only", "--output", out)
    assert result.exit_code == 0, result.output
    record = read_record(out)
    config = json.loads((run / "adapter_config.json").read_text())
    fields = gguf_fields(out / record["gguf"]["file"])
    assert fields["general.type"] == "adapter" and fields["adapter.lora.alpha"] == config["lora_alpha"]
    assert record["verified"] is True and record["check"]["modules"] == record["check"]["modules_in_run"] > 0
    assert "--lora" in record["commands"][0]


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path):
    """A tokenizer that lower-cases text is neither one llama.cpp knows nor GPT-2's splitting."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from conftest import CHATML, corpus_lines

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    folder = tmp_path / "lowercase"
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    result = export(folder, "--to", "gguf", "--output", tmp_path / "out")
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]  # the lines before it tell what the export was doing
    assert message.startswith("error:") and "cannot be converted" in message and "GPT-2" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
