"""lorakit export --to vllm: a merged folder checked against the fine-tuned model, or the run's adapter with the
exact `vllm serve --enable-lora` line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import write_adapter_run
from export_helpers import read_record

from lorakit.cli import main


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, tmp_path_factory):
    return write_adapter_run(tmp_path_factory.mktemp("vllm") / "run", tiny_llama)


@pytest.mark.slow
def test_the_merged_folder_is_checked_and_stops_on_every_end_of_turn_token(adapter_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "served"
    result = CliRunner().invoke(main, ["export", str(adapter_run), "--to", "vllm", "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = read_record(out)
    assert record["verified"] is True and record["check"]["dtype"] == "float32"
    assert record["commands"] == [f"vllm serve {out.resolve()} --served-model-name served"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = json.loads((out / "generation_config.json").read_text())
    assert {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} <= set(generation["eos_token_id"])
    assert "is_local" not in json.loads((out / "tokenizer_config.json").read_text())

    base = record["source"]["base_model"]
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                      add_generation_prompt=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_run)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert (merged - expected).abs().max() < 1e-4


def test_the_adapter_folder_comes_with_its_serve_line(adapter_run, tmp_path):
    out = tmp_path / "lora"
    result = CliRunner().invoke(main, ["export", str(adapter_run), "--to", "vllm", "--adapter-only",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = read_record(out)
    assert record["verified"] is True and record["check"]["files_identical_to_the_run"]
    base = record["source"]["base_model"]
    assert record["commands"] == [
        f"vllm serve {base} --enable-lora --lora-modules lora={out.resolve()} "
        f"--chat-template {(out / 'chat_template.jinja').resolve()} --generation-config {out.resolve()}"]
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter_run / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert "serve" in result.output and "--enable-lora" in result.output


def test_no_verify_is_said_in_the_record_and_the_output(adapter_run, tmp_path):
    out = tmp_path / "unchecked"
    result = CliRunner().invoke(main, ["export", str(adapter_run), "--to", "vllm", "--adapter-only", "--no-verify",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert read_record(out)["verified"] is None and "NOT verified" in result.output
