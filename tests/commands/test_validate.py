"""`lorakit validate` on tiny models: what it reports, and the mistakes it stops before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import facts_rows, write_jsonl
from lorakit.cli import main

# A ChatML look-alike whose assistant turn ends with a newline only: nothing marks the end of a reply, so a model
# trained on it never learns to stop.
TEMPLATE_WITHOUT_END_OF_TURN = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] + '\\n' }}"
    "{%- else -%}{{ message['content'] + '<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_recipe(tmp_path: Path, model: Path, data: list[Path], extra: str = "") -> Path:
    sources = "".join(f"    - path: {path}\n" for path in data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {model}\ndata:\n  train:\n{sources}  max_length: 128\n{extra}"
                      f"training:\n  output_dir: {tmp_path / 'out'}\n  max_steps: 12\n")
    return recipe


@pytest.fixture
def facts(tmp_path) -> list[Path]:
    return [write_jsonl(tmp_path / "messages.jsonl", facts_rows("messages")),
            write_jsonl(tmp_path / "alpaca.jsonl", facts_rows("alpaca"))]


def with_template(tiny_llama: Path, folder: Path, template: str) -> Path:
    """A copy of the tiny model whose tokenizer carries `template` as its chat template."""
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


def test_a_sound_recipe_passes_and_reports_data_examples_memory_and_steps(tiny_llama, facts, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_weights(*args, **kwargs):
        raise AssertionError("validate loaded model weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    result = run_cli("validate", write_recipe(tmp_path, tiny_llama, facts), "--samples", "3", "--gpu-memory", "24GiB")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "train: 64 rows" in out
    assert "messages.jsonl: messages, 32 of 32 rows used" in out and "alpaca.jsonl: alpaca, 32 of 32 rows used" in out
    assert "tokens per row: min " in out and "p95" in out
    # The examples mark exactly the reply and its end-of-turn token as trained (brackets: not a terminal).
    assert "example 3:" in out and "example 4:" not in out
    assert "What colour is the sky?<|im_end|>\n    <|im_start|>assistant\n    [[The sky is blue.<|im_end|>]]" in out
    assert "'<|im_end|>' is trained at the end of every assistant reply" in out
    assert "no token of a system or user message is trained" in out
    assert "saved with the adapter is the one training uses" in out
    assert "peak on one GPU: LoRA, bfloat16" in out and "fits in 24.0 GiB" in out
    assert "steps: 12 optimizer steps" in out
    assert "the run can start" in out
    assert not (tmp_path / "out").exists()  # validate writes nothing


def test_problems_are_all_listed_and_the_run_refused(tiny_llama, facts, tmp_path):
    result = run_cli("validate", write_recipe(tmp_path, tiny_llama, facts), "data.max_length=32", "--samples", "0",
                     "--gpu-memory", "100MiB")
    assert result.exit_code == 1, result.output
    # Every messages row loses its whole reply at 32 tokens: told once, as left out (not also as cut).
    assert "32 rows are left out: none of their tokens is trained within data.max_length=32" in result.output
    assert "will be cut" not in result.output
    assert "does not fit in 100 MiB of GPU memory" in result.output
    assert "example 1:" not in result.output
    assert "error: 1 problem: the run cannot start" in result.output


@pytest.mark.parametrize("template, expected", [
    (TEMPLATE_WITHOUT_END_OF_TURN,
     "the end-of-turn token '<|endoftext|>' is not trained at the end of every assistant reply in 64 of 64 rows "
     "(first: {data} row 1): the chat template does not put it after the reply at all. The model would never learn "
     "to stop"),
], ids=["end-of-turn-never-trained"])
def test_a_template_that_masks_the_wrong_tokens_fails(tiny_llama, facts, tmp_path, template, expected):
    model = with_template(tiny_llama, tmp_path / "model", template)
    data = facts if template is TEMPLATE_WITHOUT_END_OF_TURN else facts[:1]
    result = run_cli("validate", write_recipe(tmp_path, model, data), "--samples", "1")
    assert result.exit_code == 1, result.output
    assert "error: " in result.output and expected.format(data=data[0]) in result.output


def test_lora_targets_the_model_lacks_are_found_without_loading_it(tiny_llama, facts, tmp_path):
    result = run_cli("validate", write_recipe(tmp_path, tiny_llama, facts), "lora.target_modules=[nope_proj]",
                     "--samples", "0")
    assert result.exit_code == 2, result.output  # a recipe error, as `lorakit sft` reports it before loading
    assert "lora.target_modules (command line): [nope_proj] matches no layer of" in result.output
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in result.output


def test_empty_assistant_turns_fail_naming_file_and_rows(tiny_llama, tmp_path):
    rows = facts_rows("messages", repeat=1)
    rows[2]["messages"][2]["content"] = "  "
    data = write_jsonl(tmp_path / "empty.jsonl", rows)
    result = run_cli("validate", write_recipe(tmp_path, tiny_llama, [data]))
    assert result.exit_code == 1, result.output
    assert f"{data}: row 3: message 3 is an empty assistant turn" in result.output
    assert "Traceback" not in result.output


def test_recipe_mistakes_get_sfts_message_and_exit_code(tiny_llama, facts, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama, facts, extra="lora:\n  rank: 8\n")
    validate, sft = run_cli("validate", recipe), run_cli("sft", recipe)
    assert validate.exit_code == sft.exit_code == 2
    errors = [line for line in validate.output.splitlines() if "problem" in line or "lora.rank" in line]
    assert errors == [line for line in sft.output.splitlines() if "problem" in line or "lora.rank" in line]
    assert "lora.rank (line 9): unknown key; did you mean lora.r?" in validate.output


def test_what_the_hub_cannot_give_is_named(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: lorakit-tests/no-such-model\ndata:\n  train: lorakit-tests/no-such-data\n")
    result = run_cli("validate", recipe)
    assert result.exit_code == 1, result.output
    out = result.output
    model_problem = next(line for line in out.splitlines() if "problem  model.name_or_path" in line)
    assert "lorakit-tests/no-such-model" in model_problem and "HF_HUB_OFFLINE=1" in model_problem
    assert "lorakit-tests/no-such-data: not a local file or folder, and the Hub is off" in out
    assert "error: 2 problems" in out and "Traceback" not in out


def test_an_output_folder_sft_would_refuse_is_a_problem_and_left_alone(tiny_llama, facts, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama, facts)
    (tmp_path / "out").mkdir()
    notes = tmp_path / "out" / "notes.txt"
    notes.write_text("mine")
    result = run_cli("validate", recipe, "--samples", "0")
    assert result.exit_code == 1, result.output
    assert "is not empty and is not a lorakit run" in result.output
    assert notes.read_text() == "mine" and [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_a_finished_run_in_the_output_folder_is_a_warning(tiny_llama, facts, tmp_path):
    from lorakit.training.run_dir import RECORD_FILE

    recipe = write_recipe(tmp_path, tiny_llama, facts)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RECORD_FILE).write_text(json.dumps({"status": "completed"}))
    result = run_cli("validate", recipe, "--samples", "0")
    assert result.exit_code == 0, result.output
    assert "already holds a finished run; lorakit sft will stop unless given --overwrite" in result.output


def test_a_size_that_is_not_one_is_refused():
    result = run_cli("validate", "any.yaml", "--gpu-memory", "lots")
    assert result.exit_code == 2
    assert "error: --gpu-memory: 'lots' is not a size; write it like 24GiB" in result.output


def test_trained_tokens_are_coloured_in_a_terminal(tiny_llama):
    import click

    from lorakit.data import Tokenization
    from lorakit.models.loading import load_tokenizer
    from lorakit.data.render import render_example

    tokenizer, _ = load_tokenizer({"name_or_path": str(tiny_llama)})
    example = {"messages": facts_rows("messages", repeat=1)[0]["messages"]}
    ids, labels = Tokenization.for_tokenizer(tokenizer, "completions").encode(example)
    coloured = render_example(tokenizer, ids, labels, color=True)
    plain = render_example(tokenizer, ids, labels, color=False)
    assert click.style("The sky is blue.<|im_end|>", fg="green", bold=True, underline=True) in coloured
    assert click.unstyle(coloured) == plain.replace("[[", "").replace("]]", "")
    assert plain.endswith("[[The sky is blue.<|im_end|>]]\n")
