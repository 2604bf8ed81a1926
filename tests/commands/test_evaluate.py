"""lorakit eval: a run that memorised answers beats its base, and every number of the report is recomputed here."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FACTS, facts_rows, write_adapter_run, write_jsonl

from lorakit.cli import main

SYSTEM = "Answer briefly."


def memorising_recipe(folder: Path, base: Path, extra: str = "", steps: int = 40) -> Path:
    """Eight facts, a quarter of the rows held out (each fact is repeated, so the held-out answers were seen).

    The tiny random model's LM head gives near-uniform logits; training it too (modules_to_save) lets 30 steps
    memorise most answers. One eval batch, so the trainer's eval loss is a plain mean over tokens, like lorakit's.
    """
    data = write_jsonl(folder / "facts.jsonl", facts_rows("messages"))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""\
model:
  name_or_path: {base}
{extra}lora:
  r: 8
  lora_alpha: 16
  lora_dropout: 0.0
  modules_to_save: [lm_head]
data:
  train:
    - path: {data}
  eval_fraction: 0.25
training:
  output_dir: {folder / 'run'}
  max_steps: {steps}
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 32
  learning_rate: 1.0e-2
  warmup_steps: 0
  logging_steps: 10
  eval_strategy: "no"
  save_strategy: "no"
  seed: 0
""", encoding="utf-8")
    return recipe


@pytest.fixture(scope="module")
def memorised(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run folder) of a real `lorakit sft` run."""
    from lorakit.commands.sft import run_sft

    recipe = memorising_recipe(tmp_path_factory.mktemp("memorised"), tiny_llama)
    return recipe, run_sft(str(recipe))


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, tmp_path_factory) -> Path:
    """A run folder written directly (random adapter, recipe without eval data): for checks that need no training."""
    folder = tmp_path_factory.mktemp("adapter") / "run"
    data = write_jsonl(folder.parent / "facts.jsonl", facts_rows("messages", repeat=1))
    return write_adapter_run(folder, tiny_llama, data)


def evaluate(*args: str):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


# ---------------------------------------------------------------- independent recomputation


def own_exact_match(prediction: str, reference: str) -> float:
    return 1.0 if prediction.strip() == reference.strip() else 0.0


def own_f1(prediction: str, reference: str) -> float:
    split = lambda text: re.findall(r"\w+|[^\w\s]", text.lower())  # noqa: E731
    a, b = split(prediction), split(reference)
    if not a or not b:
        return 1.0 if a == b else 0.0
    same = sum((Counter(a) & Counter(b)).values())
    return 0.0 if same == 0 else 2 * same / (len(a) + len(b))


def conversation_of(example: dict) -> list[dict]:
    question = next(q for q, answer in FACTS if answer == example["reference"])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
            {"role": "assistant", "content": example["reference"]}]


def own_reply_loss(model, tokenizer, conversations: list[list[dict]]) -> float:
    """Mean loss over the reply tokens and the end-of-turn token after them, from transformers' own loss."""
    import torch

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for messages in conversations:
        prompt = list(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                    return_dict=True)["input_ids"])
        full = list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
        assert full[:len(prompt)] == prompt
        end = full.index(end_of_turn, len(prompt)) + 1
        labels = [-100] * len(prompt) + full[len(prompt):end] + [-100] * (len(full) - end)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss.item()
        tokens = end - len(prompt)
        total += loss * tokens
        count += tokens
    return total / count


@pytest.mark.slow
def test_memorising_run_beats_its_base_and_the_report_adds_up(memorised, tiny_llama, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run = memorised
    report_file = tmp_path / "report.json"
    result = evaluate(run, "--compare-base", "--output", report_file)
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    model, base = report["metrics"]["model"], report["metrics"]["base"]

    assert model["exact_match"] > base["exact_match"]
    assert model["token_f1"] > base["token_f1"] + 0.3
    assert model["loss"] < base["loss"] - 1

    # The held-out quarter, scored as training scored it: the trainer's own final eval loss.
    record = json.loads((run / "lorakit_run.json").read_text())
    assert report["data"]["loss_rows"] == 8 and "held out" in report["data"]["description"]
    assert model["loss"] == pytest.approx(record["metrics"]["eval_loss"], abs=1e-4)

    # Every number again, from plain transformers + peft and this file's own metric code.
    examples = report["examples"]
    assert len(examples) == 8
    for name, key in (("model", "prediction"), ("base", "base_prediction")):
        matches = [own_exact_match(e[key], e["reference"]) for e in examples]
        f1s = [own_f1(e[key], e["reference"]) for e in examples]
        assert report["metrics"][name]["exact_match"] == pytest.approx(sum(matches) / len(matches))
        assert report["metrics"][name]["token_f1"] == pytest.approx(sum(f1s) / len(f1s))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run).eval()
    conversations = [conversation_of(e) for e in examples]
    assert model["loss"] == pytest.approx(own_reply_loss(peft_model, tokenizer, conversations), abs=1e-4)
    with peft_model.disable_adapter():
        assert base["loss"] == pytest.approx(own_reply_loss(peft_model, tokenizer, conversations), abs=1e-4)
    assert model["perplexity"] == pytest.approx(math.exp(model["loss"]))

    # Batched, left-padded generation gives what one prompt at a time gives.
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for example, messages in zip(examples, conversations):
        ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = peft_model.generate(**ids, max_new_tokens=128, do_sample=False, eos_token_id=stops,
                                      pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert example["prediction"] == reply

    for text in ("loss", "perplexity", "exact match", "token F1", "sample 1", "reference", "base"):
        assert text in result.output


@pytest.mark.slow
def test_a_recipe_target_uses_its_eval_data_and_output_folder(memorised):
    recipe, run = memorised
    result = evaluate(recipe)
    assert result.exit_code == 0, result.output
    report = json.loads((run / "lorakit_eval.json").read_text())  # default: beside the run it scored
    assert report["target"] == str(recipe) and report["data"]["loss_rows"] == 8
    assert report["metrics"]["model"]["exact_match"] > 0


@pytest.mark.slow
def test_a_qlora_run_is_scored_on_the_4bit_base_it_trained_on(tiny_llama, tmp_path):
    from lorakit.commands.sft import run_sft

    recipe = memorising_recipe(tmp_path, tiny_llama, "quantization:\n  load_in_4bit: true\n", steps=3)
    run = run_sft(str(recipe))
    result = evaluate(run, "--output", tmp_path / "report.json", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["quantization"]["load_in_4bit"] is True
    trainer_loss = json.loads((run / "lorakit_run.json").read_text())["metrics"]["eval_loss"]
    assert report["metrics"]["model"]["loss"] == pytest.approx(trainer_loss, abs=1e-4)


# ---------------------------------------------------------------- data, formats, errors (no training)


def test_each_format_gives_its_last_reply_as_the_reference(tiny_llama, tmp_path):
    from lorakit.commands.evaluate import load_eval_data
    from lorakit.models.inference import load_target_tokenizer, resolve_target

    target = resolve_target(str(tiny_llama))
    tokenizer = load_target_tokenizer(target)
    rows = {
        "messages": [{"messages": [{"role": "user", "content": "What do bees make?"},
                                   {"role": "assistant", "content": "Honey."},
                                   {"role": "user", "content": "And cows?"},
                                   {"role": "assistant", "content": "Cows make milk."}]}],
        "alpaca": [{"instruction": "What is frozen water called?", "input": "", "output": "Frozen water is ice."}],
        "prompt_completion": [{"prompt": "Where do fish live? ", "completion": "Fish live in water."}],
        "text": [{"text": "the quick brown fox jumps over the lazy dog"}],
    }
    expected = {"messages": "Cows make milk.", "alpaca": "Frozen water is ice.",
                "prompt_completion": "Fish live in water."}
    for fmt, data in rows.items():
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", data)
        loaded = load_eval_data(target, str(path), None, tokenizer)
        assert len(loaded.loss_rows) == 1
        if fmt == "text":
            assert loaded.prompts == [] and "loss only" in loaded.notes[0]
            continue
        assert loaded.references == [expected[fmt]]
        prompt = tokenizer.decode(loaded.prompts[0])
        assert expected[fmt] not in prompt
    multi_turn = tokenizer.decode(load_eval_data(target, str(tmp_path / "messages.jsonl"), None,
                                                 tokenizer).prompts[0])
    assert "Honey." in multi_turn and multi_turn.endswith("<|im_start|>assistant\n")


def test_a_model_folder_on_text_data_reports_loss_only(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "What do bees make? Bees make honey."]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    result = evaluate(tiny_llama, "--data", data, "--output", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report.json").read_text())["metrics"]["model"]
    assert metrics["exact_match"] is None and metrics["replies"] == 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # text rows are trained up to EOS
        with torch.no_grad():
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * (len(ids) - 1)
        count += len(ids) - 1
    assert metrics["loss"] == pytest.approx(total / count, abs=1e-4)
    assert metrics["trained_tokens"] == count


def test_compare_base_needs_a_known_base(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages", repeat=1))
    result = evaluate(tiny_llama, "--data", data, "--compare-base")
    assert result.exit_code == 2
    assert "--compare-base: the base of" in result.output and "is unknown" in result.output


def test_a_run_without_eval_data_asks_for_data(adapter_run):
    result = evaluate(adapter_run)
    assert result.exit_code == 2
    assert "neither data.eval nor data.eval_fraction; pass --data" in result.output
    assert not (adapter_run / "lorakit_eval.json").exists()



def test_a_merged_folder_is_scored_on_the_eval_data_of_its_run(tiny_llama, tmp_path):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", facts_rows("messages", repeat=1))
    run = write_adapter_run(tmp_path / "run", tiny_llama)
    recipe = run / "lorakit_recipe.yaml"
    recipe.write_text(recipe.read_text().replace("training:", f"  eval:\n    - path: {heldout}\ntraining:"))
    merged = tmp_path / "merged"
    assert CliRunner().invoke(main, ["merge", str(run), "--output", str(merged)]).exit_code == 0

    result = evaluate(merged, "--output", tmp_path / "merged.json")
    assert result.exit_code == 0, result.output
    assert f"eval data and settings of {run}" in result.output and str(heldout) in result.output
    assert evaluate(run, "--output", tmp_path / "run.json").exit_code == 0
    scores = [json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["model"] for name in ("merged", "run")]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], abs=1e-4)
    assert scores[0]["exact_match"] == scores[1]["exact_match"]


@pytest.mark.parametrize("make, told", [
    (lambda tmp: tmp / "missing-run", "no such file or folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds neither an adapter"),
    (lambda tmp: (tmp / "notes.txt").write_text("x") and tmp / "notes.txt", "is a file, not a run folder"),
])
def test_a_wrong_target_is_named_with_what_would_work(tmp_path, make, told):
    result = evaluate(make(tmp_path), "--data", "facts.jsonl")
    assert result.exit_code == 2
    assert told in result.output and "Traceback" not in result.output


def test_an_output_file_lorakit_did_not_write_is_never_replaced(adapter_run, tmp_path):
    mine = tmp_path / "results.json"
    mine.write_text('{"mine": true}')
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages", repeat=1))
    result = evaluate(adapter_run, "--data", data, "--output", mine)
    assert result.exit_code == 2
    assert "is not a lorakit eval report; nothing was changed" in result.output
    assert mine.read_text() == '{"mine": true}'


def test_a_run_with_data_writes_its_report_and_a_rerun_replaces_it(adapter_run, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages", repeat=1))
    for _ in range(2):
        result = evaluate(adapter_run, "--data", data, "--max-new-tokens", "4", "--batch-size", "3")
        assert result.exit_code == 0, result.output
    report = json.loads((adapter_run / "lorakit_eval.json").read_text())
    assert report["report"] == "lorakit eval" and report["data"]["generation_rows"] == len(FACTS)
    assert report["metrics"]["model"]["replies_cut_at_max_new_tokens"] <= len(FACTS)
    (adapter_run / "lorakit_eval.json").unlink()


def test_harness_without_lm_eval_says_how_to_install_it(adapter_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages", repeat=1))
    result = evaluate(adapter_run, "--data", data, "--harness", "hellaswag")
    assert result.exit_code == 2
    assert "pip install lm-eval" in result.output


def test_held_out_rows_warn_when_the_training_data_changed_since_the_run(adapter_run, tmp_path):
    import shutil

    from lorakit.data import source_fingerprint

    run = Path(shutil.copytree(adapter_run, tmp_path / "run"))
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows("messages"))
    recipe = (run / "lorakit_recipe.yaml").read_text().replace(
        f"    - path: {adapter_run.parent / 'facts.jsonl'}\n", f"    - path: {data}\n  eval_fraction: 0.25\n")
    (run / "lorakit_recipe.yaml").write_text(recipe)
    notes = {}
    for case, fingerprint in (("same", source_fingerprint({"path": str(data)}, None)), ("edited", "sha256:0ld")):
        (run / "lorakit_run.json").write_text(json.dumps(
            {"status": "completed", "data": {"train": {"sources": [{"name": str(data), "fingerprint": fingerprint}]}}}))
        result = evaluate(run, "--max-new-tokens", 2, "--output", tmp_path / f"{case}.json")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"{case}.json").read_text())
        assert report["data"]["loss_rows"] == 8  # a quarter of 32 rows, as training held out
        notes[case] = report["data"]["notes"]
    assert not any("changed" in note for note in notes["same"])
    assert any(f"training data changed since the run ({data})" in note for note in notes["edited"])
