"""lorakit generate: the reply is what plain transformers (+ peft) give greedily through the chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_adapter_run
from lorakit.cli import main


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, tmp_path_factory) -> Path:
    """A run folder with a random (non-zero) adapter: no training needed to tell it from its base."""
    return write_adapter_run(tmp_path_factory.mktemp("adapter") / "run", tiny_llama)


def plain_greedy_reply(base: Path, adapter: Path | None, messages: list[dict], max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def generate(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, ["generate", *map(str, args)], input=stdin)


@pytest.mark.parametrize("how", ["argument", "stdin", "system"])
def test_run_reply_is_base_plus_adapter_greedy(adapter_run, tiny_llama, how):
    question = "What do bees make?"
    messages = [{"role": "user", "content": question}]
    if how == "argument":
        result = generate(adapter_run, question, "--max-new-tokens", 12)
    elif how == "stdin":
        result = generate(adapter_run, "--max-new-tokens", 12, stdin=question + "\n")
    else:
        result = generate(adapter_run, question, "--system", "Answer briefly.", "--max-new-tokens", 12)
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    assert result.exit_code == 0, result.output
    expected = plain_greedy_reply(tiny_llama, adapter_run, messages, 12)
    assert result.stdout == expected + "\n"  # only the reply goes to standard output
    assert expected != plain_greedy_reply(tiny_llama, None, messages, 12)  # the adapter is in use


def test_a_model_folder_replies_on_its_own(tiny_llama):
    result = generate(tiny_llama, "Which planet is red?", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    expected = plain_greedy_reply(tiny_llama, None, [{"role": "user", "content": "Which planet is red?"}], 8)
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("args, stdin, told", [
    (["{run}", "   "], None, "the prompt is empty"),
    (["{run}", "-"], "\n", "the prompt is empty"),
    (["{missing}", "hi"], None, "no such file or folder"),
])
def test_bad_input_ends_in_one_clear_line(adapter_run, tmp_path, args, stdin, told):
    names = {"run": adapter_run, "missing": tmp_path / "nowhere"}
    result = generate(*[a.format(**names) for a in args], stdin=stdin)
    assert result.exit_code == 2
    assert told in result.output and "Traceback" not in result.output


def test_importing_the_commands_loads_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, lorakit.commands.merge, lorakit.commands.evaluate, lorakit.commands.generate, "
            "lorakit.models.inference, lorakit.evaluation.metrics; print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', "
            "'datasets', 'huggingface_hub', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
