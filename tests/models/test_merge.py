"""lorakit merge: the merged folder computes what base + adapter computes, loads without peft, and refuses bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_tokenizer, facts_rows, fast_training, write_adapter_run, write_jsonl

from lorakit.cli import main


def train_run(folder: Path, base: Path, extra: str = "", steps: int = 3) -> Path:
    """A real `lorakit sft` run: a few steps are enough to move the adapter away from its zero start."""
    from lorakit.commands.sft import run_sft

    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "facts.jsonl", facts_rows("messages"))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {base}\n{extra}data:\n  train:\n    - path: {data}\n"
                      + fast_training(folder / "run", steps), encoding="utf-8")
    return run_sft(str(recipe))


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("lora"), tiny_llama)


@pytest.fixture(scope="module")
def qlora_run(tiny_llama, tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("qlora"), tiny_llama, "quantization:\n  load_in_4bit: true\n")


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, tmp_path_factory) -> Path:
    return write_adapter_run(tmp_path_factory.mktemp("adapter") / "run", tiny_llama)


def merge(*args: str):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


def prompt_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What do bees make?"}]
    return list(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"])


def base_and_adapter_logits(base: Path, run: Path, ids: list[int]):
    """(base logits, base + adapter logits), computed with plain transformers and peft in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run).eval()
    with torch.no_grad():
        with_adapter = model(torch.tensor([ids])).logits[0]
        with model.disable_adapter():
            without = model(torch.tensor([ids])).logits[0]
    return without, with_adapter


def logits_without_peft(folder: Path, ids: list[int], out: Path):
    """Load the merged folder in a fresh interpreter where peft cannot be imported, as a user without it would."""
    import torch

    code = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # import peft now fails, and transformers sees no peft
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.tensor([{ids}])).logits[0], {str(out)!r})
        assert "peft" not in sys.modules or sys.modules["peft"] is None
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return torch.load(out)


@pytest.mark.slow
def test_lora_merge_matches_base_plus_adapter_and_loads_without_peft(lora_run, tiny_llama, tmp_path):
    out = tmp_path / "merged"
    result = merge(lora_run, "--output", out)
    assert result.exit_code == 0, result.output
    assert "passed" in result.output

    ids = prompt_ids(lora_run)
    base, expected = base_and_adapter_logits(tiny_llama, lora_run, ids)
    merged = logits_without_peft(out, ids, tmp_path / "logits.pt")
    assert (expected - base).abs().max() > 1e-2  # the adapter does change the model, so the comparison means something
    assert (merged - expected).abs().max() < 1e-4

    record = json.loads((out / "lorakit_merge.json").read_text())
    assert record["check"]["passed"] and record["dtype"] == "float32"
    assert record["check"]["max_abs_diff"] <= record["check"]["tolerance"]["max_abs_diff"]
    assert record["check"]["prompts"] >= 4

    files = {p.name for p in out.iterdir()}
    assert "config.json" in files and any(name.endswith(".safetensors") for name in files)
    assert not any(name.startswith("adapter_") or name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert (out / "chat_template.jinja").read_text() == (lora_run / "chat_template.jinja").read_text()
    generation = json.loads((out / "generation_config.json").read_text())
    vocab = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    ids_of = {token["content"]: token["id"] for token in vocab}
    assert {ids_of["<|endoftext|>"], ids_of["<|im_end|>"]} <= set(generation["eos_token_id"])
    assert generation["pad_token_id"] == ids_of["<|pad|>"]
    assert not list(tmp_path.glob(".merged.partial-*"))


@pytest.mark.slow
def test_qlora_merge_goes_into_full_precision_weights(qlora_run, tiny_llama, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = merge(qlora_run, "--output", out, "--into", "original")  # the default, dequantized: test_qlora_merge.py
    assert result.exit_code == 0, result.output

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F32"}

    ids = prompt_ids(qlora_run)
    base, expected = base_and_adapter_logits(tiny_llama, qlora_run, ids)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        actual = merged(torch.tensor([ids])).logits[0]
    assert (expected - base).abs().max() > 1e-2
    assert (actual - expected).abs().max() < 1e-4

    record = json.loads((out / "lorakit_merge.json").read_text())
    assert record["trained_on"]["quantization"]["load_in_4bit"] is True
    assert record["check"]["passed"]
    assert record["vs_training_model"]["measured"]  # the 4-bit model training used, compared for information


def build_other_base(folder: Path, **config) -> Path:
    """A tiny Llama that differs from the conftest one in the given config values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
    settings.update(config)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("other, expected", [
    ("qwen", "architecture: the run was trained on"),
    ("narrow", "takes 32 inputs in the base, 64 in the adapter"),
    ("small_vocab", "vocabulary: the run's tokenizer has"),
    ("deeper_adapter", "which the base does not have"),
])
def test_mismatched_base_is_refused(adapter_run, tiny_qwen, tmp_path, other, expected):
    bases = {
        "qwen": lambda: tiny_qwen,
        "narrow": lambda: build_other_base(tmp_path / "narrow", hidden_size=32, head_dim=8),
        "small_vocab": lambda: build_other_base(tmp_path / "small", vocab_size=300),
        "deeper_adapter": lambda: build_other_base(tmp_path / "shallow", num_hidden_layers=1),
    }
    out = tmp_path / "merged"
    result = merge(adapter_run, "--base", bases[other](), "--output", out)
    assert result.exit_code == 2, result.output
    assert "does not fit the base" in result.output and expected in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_missing_run_folder_is_refused(tmp_path):
    result = merge(tmp_path / "no-such-run")
    assert result.exit_code == 2
    assert "no-such-run: no such run folder" in result.output


def test_folder_without_adapter_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = merge(tmp_path)
    assert result.exit_code == 2
    assert "holds no adapter_config.json" in result.output


def test_existing_output_is_never_overwritten(adapter_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = merge(adapter_run, "--output", out)
    assert result.exit_code == 2
    assert "already exists and is not empty; nothing was changed" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


def test_default_output_is_beside_the_run_and_taken_once(adapter_run):
    default = adapter_run.parent / f"{adapter_run.name}-merged"
    first = merge(adapter_run)
    assert first.exit_code == 0, first.output
    assert (default / "lorakit_merge.json").is_file()
    second = merge(adapter_run)
    assert second.exit_code == 2 and "already exists" in second.output


def test_a_failed_check_leaves_nothing_behind(adapter_run, tmp_path, monkeypatch):
    from lorakit.models import merge as merge_module

    monkeypatch.setitem(merge_module.TOLERANCES, "float32", (0.0, 0.0))  # no rounding difference is allowed
    out = tmp_path / "merged"
    result = merge(adapter_run, "--output", out)
    assert result.exit_code == 1, result.output
    assert "disagrees with base + adapter" in result.output and "nothing was written" in result.output
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))


@pytest.mark.parametrize("dtype, stored", [("bfloat16", "BF16")])
def test_half_precision_merge_is_checked_against_its_own_tolerance(adapter_run, tmp_path, dtype, stored):
    from safetensors import safe_open

    out = tmp_path / "merged"
    result = merge(adapter_run, "--dtype", dtype, "--output", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "lorakit_merge.json").read_text())
    assert record["dtype"] == dtype and record["check"]["passed"]
    assert record["check"]["max_abs_diff"] > 0  # rounding to half precision shows, within the tolerance
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {stored}
