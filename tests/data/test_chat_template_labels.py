"""Trained tokens under the verbatim chat templates of twelve model families (tests/data/chat_templates/).

The ground truth of each case is written here from reading the family's template: the rendered conversation
with [[ ]] around exactly the text the model must learn to write (each reply, from the end of the generation prompt
to the end-of-turn token that closes it). The test checks that this text, marks removed, is what the template
renders, that lorakit trains the same token ids the template produces, and that the trained runs are those marked.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from chat_template_families import (A1, A2, A3, FAMILIES, Q1, Q2, Q3, REASONING, SYSTEM, WEATHER_A, WEATHER_CALL,
                                    WEATHER_Q, WEATHER_RESULT, WEATHER_TOOL, build_tokenizer)
from conftest import write_jsonl
from lorakit.data import IGNORE, DataError, Tokenization, prepare_data, row_to_example

ALPACA = {"instruction": "Describe the weather.", "input": "Paris, today", "output": "It is sunny."}
ALPACA_USER = "Describe the weather.\n\nParis, today"
TOOL_MESSAGES = [{"role": "user", "content": WEATHER_Q},
                 {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
                 {"role": "tool", "content": WEATHER_RESULT, "tool_call_id": "call00001", "name": "get_weather"},
                 {"role": "assistant", "content": WEATHER_A}]
INLINE_REASONING = f"<think>\n{REASONING}\n</think>\n\n"
TOOL_JSON = json.dumps(WEATHER_TOOL, ensure_ascii=False)
CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}'


def today() -> str:
    return time.strftime("%d %b %Y")  # Llama 3.2's template stamps the day it renders


# ---------------------------------------------------------------- each family's rendering, written from its template

def llama3(turns, system=None, date="26 Jul 2024"):
    out = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
           f"Today Date: {date}\n\n{system or ''}<|eot_id|>")
    for user, reply in turns:
        out += (f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n[[{reply}<|eot_id|>]]")
    return out


def chatml(turns, system=None, default_system=None, think_last=False):
    system = system or default_system
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for number, (user, reply) in enumerate(turns, 1):
        think = "<think>\n\n</think>\n\n" if think_last and number == len(turns) else ""
        out += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n[[{think}{reply}<|im_end|>]]\n"
    return out


def gemma(turns, system=None):
    out = "<bos>"
    for number, (user, reply) in enumerate(turns):
        prefix = f"{system}\n\n" if system and number == 0 else ""
        out += f"<start_of_turn>user\n{prefix}{user}<end_of_turn>\n<start_of_turn>model\n[[{reply}<end_of_turn>]]\n"
    return out


def mistral(turns, system=None, space=" "):
    # The system prompt goes into the user turn that is the conversation's last message (`loop.last`): in a
    # conversation that ends with a reply there is none, so it is not rendered at all.
    out = "<s>"
    for user, reply in turns:
        out += f"[INST]{space}{user}[/INST][[{space}{reply}</s>]]"
    return out


def phi35(turns, system=None):
    out = f"<|system|>\n{system}<|end|>\n" if system else ""
    for user, reply in turns:
        out += f"<|user|>\n{user}<|end|>\n<|assistant|>\n[[{reply}<|end|>]]\n"
    return out + "<|endoftext|>"


def phi4(turns, system=None):
    out = f"<|im_start|>system<|im_sep|>{system}<|im_end|>" if system else ""
    for user, reply in turns:
        out += f"<|im_start|>user<|im_sep|>{user}<|im_end|><|im_start|>assistant<|im_sep|>[[{reply}<|im_end|>]]"
    return out


def deepseek(turns, system=None):
    out = f"<｜begin▁of▁sentence｜>{system or ''}"
    for user, reply in turns:
        out += f"<｜User｜>{user}<｜Assistant｜>[[{reply}<｜end▁of▁sentence｜>]]"
    return out


RENDER = {
    "llama-3.1": llama3,
    "llama-3.2": lambda turns, system=None: llama3(turns, system, date=today()),
    "qwen2.5": lambda turns, system=None: chatml(
        turns, system, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    # Qwen3 writes an empty think block into the reply that ends the conversation only.
    "qwen3": lambda turns, system=None: chatml(turns, system, think_last=True),
    "gemma-2": gemma,
    "gemma-3": gemma,
    "mistral-v0.3": mistral,
    "mistral-nemo": lambda turns, system=None: mistral(turns, system, space=""),
    "phi-3.5": phi35,
    "phi-4": phi4,
    "smollm2": lambda turns, system=None: chatml(
        turns, system, default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "deepseek-r1-distill": deepseek,
}

QWEN_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
              f"with function signatures within <tools></tools> XML tags:\n<tools>\n{TOOL_JSON}\n</tools>\n\nFor each "
              "function call, return a json object with function name and arguments within <tool_call></tool_call> "
              'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
              "<|im_end|>\n")
QWEN_TOOL_TURNS = (f"<|im_start|>user\n{WEATHER_Q}<|im_end|>\n<|im_start|>assistant\n"
                   f"[[<tool_call>\n{CALL_JSON}}}\n</tool_call><|im_end|>]]\n"
                   f"<|im_start|>user\n<tool_response>\n{WEATHER_RESULT}\n</tool_response><|im_end|>\n"
                   "<|im_start|>assistant\n[[THINK" + WEATHER_A + "<|im_end|>]]\n")
LLAMA3_TOOLS = ("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December "
                "2023\nToday Date: {date}\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following "
                "functions, please respond with a JSON for a function call with its proper arguments that best answers "
                'the given prompt.\n\nRespond in the format {{"name": function name, "parameters": dictionary of '
                'argument name and its value}}.Do not use variables.\n\n'
                + json.dumps(WEATHER_TOOL, indent=4, ensure_ascii=False).replace("{", "{{").replace("}", "}}")
                + f"\n\n{WEATHER_Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                '[[{{"name": "get_weather", "parameters": {{"city": "Paris"}}}}<|eot_id|>]]'
                f'<|start_header_id|>ipython<|end_header_id|>\n\n"{WEATHER_RESULT}"<|eot_id|>'
                f"<|start_header_id|>assistant<|end_header_id|>\n\n[[{WEATHER_A}<|eot_id|>]]")
MISTRAL_TOOL_SPEC = ('{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a '
                     f'city.", "parameters": {json.dumps(WEATHER_TOOL["function"]["parameters"])}}}}}')
TOOL_CASES = {
    "llama-3.1": "<|begin_of_text|>" + LLAMA3_TOOLS.format(date="26 Jul 2024"),
    "llama-3.2": "<|begin_of_text|>" + LLAMA3_TOOLS.format(date=today()),
    "qwen2.5": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
                + QWEN_TOOLS + QWEN_TOOL_TURNS.replace("THINK", "")),
    # The tool-call turn comes before the end of the conversation: no think block; the final answer has one.
    "qwen3": "<|im_start|>system\n" + QWEN_TOOLS + QWEN_TOOL_TURNS.replace("THINK", "<think>\n\n</think>\n\n"),
    "mistral-v0.3": (f"<s>[AVAILABLE_TOOLS] [{MISTRAL_TOOL_SPEC}][/AVAILABLE_TOOLS][INST] {WEATHER_Q}[/INST]"
                     f'[[[TOOL_CALLS] [{CALL_JSON}, "id": "call00001"}}]</s>]]'
                     f'[TOOL_RESULTS] {{"content": {WEATHER_RESULT}, "call_id": "call00001"}}[/TOOL_RESULTS]'
                     f"[[ {WEATHER_A}</s>]]"),
    "mistral-nemo": (f"<s>[AVAILABLE_TOOLS][{MISTRAL_TOOL_SPEC}][/AVAILABLE_TOOLS][INST]{WEATHER_Q}[/INST]"
                     f'[[[TOOL_CALLS][{CALL_JSON}, "id": "call00001"}}]</s>]]'
                     f'[TOOL_RESULTS]{{"content": {WEATHER_RESULT}, "call_id": "call00001"}}[/TOOL_RESULTS]'
                     f"[[{WEATHER_A}</s>]]"),
}
REASONING_CASES = {
    # The first reply's reasoning is history and dropped by the template; the last keeps it, think tags trained.
    "qwen3": ([{"role": "user", "content": Q1}, {"role": "assistant", "content": A1, "reasoning_content": REASONING},
               {"role": "user", "content": Q2}, {"role": "assistant", "content": INLINE_REASONING + A2}],
              (f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n[[{A1}<|im_end|>]]\n"
               f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n"
               f"[[<think>\n{REASONING}\n</think>\n\n{A2}<|im_end|>]]\n")),
    # DeepSeek-R1-Distill keeps only what follows </think> (here "\n\n" and the answer).
    "deepseek-r1-distill": ([{"role": "user", "content": Q1}, {"role": "assistant", "content": INLINE_REASONING + A1},
                             {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}],
                            (f"<｜begin▁of▁sentence｜><｜User｜>{Q1}<｜Assistant｜>[[\n\n{A1}<｜end▁of▁sentence｜>]]"
                             f"<｜User｜>{Q2}<｜Assistant｜>[[{A2}<｜end▁of▁sentence｜>]]")),
}


def conversation(turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def cases(name: str) -> list[tuple[str, str, dict, str]]:
    """(case, format, row, marked ground truth) of a family."""
    family, render = FAMILIES[name], RENDER[name]
    three = [(Q1, A1), (Q2, A2), (Q3, A3)]
    found = [("single-turn", "messages", {"messages": conversation([(Q1, A1)])}, render([(Q1, A1)])),
             ("three-turn", "messages", {"messages": conversation(three)}, render(three)),
             ("alpaca", "alpaca", ALPACA, render([(ALPACA_USER, ALPACA["output"])])),
             ("prompt-completion", "prompt_completion", {"prompt": Q1 + "\n", "completion": A1},
              f"{family.bos if family.add_bos else ''}{Q1}\n[[{A1}{family.eos}]]")]
    if family.system:
        found.append(("system", "messages", {"messages": conversation([(Q1, A1)], SYSTEM)},
                      render([(Q1, A1)], SYSTEM)))
        found.append(("system-three-turn", "messages", {"messages": conversation(three, SYSTEM)},
                      render(three, SYSTEM)))
    if name in TOOL_CASES:
        found.append(("tool-call", "messages", {"messages": TOOL_MESSAGES, "tools": [WEATHER_TOOL]}, TOOL_CASES[name]))
    if name in REASONING_CASES:
        messages, expected = REASONING_CASES[name]
        found.append(("reasoning", "messages", {"messages": messages}, expected))
    return found


ALL_CASES = [(name, *case) for name in FAMILIES for case in cases(name)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Each family's tokenizer, saved and loaded back as lorakit loads it."""
    from lorakit.models.loading import load_tokenizer

    loaded = {}
    for name, family in FAMILIES.items():
        folder = tmp_path_factory.mktemp(name)
        build_tokenizer(folder, family)
        loaded[name], _ = load_tokenizer({"name_or_path": str(folder)})
    return loaded


def marked(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The decoded tokens, with [[ ]] around each run of trained ones."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels):
        assert label in (IGNORE, token), "a trained token's label is not its own id"
        if runs and runs[-1][1] == (label != IGNORE):
            runs[-1][0].append(token)
        else:
            runs.append(([token], label != IGNORE))
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return "".join(f"[[{decode(part)}]]" if trained else decode(part) for part, trained in runs)


@pytest.mark.parametrize("name, case, fmt, row, expected", ALL_CASES,
                         ids=[f"{name}-{case}" for name, case, *_ in ALL_CASES])
def test_trained_tokens_are_exactly_the_ground_truth(tokenizers, name, case, fmt, row, expected):
    tokenizer = tokenizers[name]
    example = row_to_example(row, fmt)
    ids, labels = Tokenization.for_tokenizer(tokenizer, "completions").encode(example)
    plain = expected.replace("[[", "").replace("]]", "")
    if "messages" in example:
        tools = example.get("tools")
        assert tokenizer.apply_chat_template(example["messages"], tools=tools, tokenize=False) == plain
        assert ids == list(tokenizer.apply_chat_template(example["messages"], tools=tools, return_dict=True,
                                                         tokenize=True)["input_ids"])
    else:
        assert ids == tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
    assert marked(tokenizer, ids, labels) == expected


def prepare(tokenizer, path, **extra):
    section = {"train": [{"path": str(path), "format": None, "columns": {}, "fraction": None, "weight": None}],
               "eval": None, "eval_fraction": None, "max_length": 512, "truncation": "truncate",
               "train_on": "completions", **extra}
    return prepare_data(section, tokenizer)


def good_row():
    return {"messages": conversation([(Q1, A1)])}


@pytest.mark.parametrize("name", [name for name, family in FAMILIES.items() if not family.tools])
def test_tool_calls_under_a_template_without_tool_support_name_file_and_row(tokenizers, tmp_path, name):
    path = write_jsonl(tmp_path / "tools.jsonl", [good_row(), {"messages": TOOL_MESSAGES, "tools": [WEATHER_TOOL]}])
    with pytest.raises(DataError) as info:
        prepare(tokenizers[name], path)
    message = str(info.value)
    assert message.startswith(f"{path}: row 2: ") and "no tool support" in message
    assert tokenizers[name].name_or_path in message


def test_a_template_that_refuses_a_system_prompt_names_file_and_row(tokenizers, tmp_path):
    path = write_jsonl(tmp_path / "system.jsonl", [good_row(), {"messages": conversation([(Q1, A1)], SYSTEM)}])
    with pytest.raises(DataError) as info:
        prepare(tokenizers["gemma-2"], path)
    assert str(info.value).startswith(f"{path}: row 2: the chat template cannot render it: System role not supported")


def test_reasoning_a_template_drops_from_the_final_reply_is_an_error(tokenizers, tmp_path):
    rows = [good_row(), {"messages": [{"role": "user", "content": Q1},
                                      {"role": "assistant", "content": INLINE_REASONING + A1}]}]
    with pytest.raises(DataError) as info:
        prepare(tokenizers["deepseek-r1-distill"], write_jsonl(tmp_path / "r.jsonl", rows))
    assert "row 2: message 2: the chat template of" in str(info.value) and "drops the reasoning" in str(info.value)


# ChatML, except that it rewrites every reply (its full stops become exclamation marks).
TEMPLATE_THAT_REWRITES_REPLIES = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{{ m['content'] | replace('.', '!') }}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_template_that_rewrites_the_reply_is_an_error_naming_file_row_and_template(tokenizers, tmp_path):
    tokenizer = tokenizers["qwen2.5"]
    original = tokenizer.chat_template
    tokenizer.chat_template = TEMPLATE_THAT_REWRITES_REPLIES
    try:
        path = write_jsonl(tmp_path / "m.jsonl", [good_row()])
        with pytest.raises(DataError) as info:
            prepare(tokenizer, path)
    finally:
        tokenizer.chat_template = original
    assert str(info.value).startswith(f"{path}: row 1: message 2: the chat template of {tokenizer.name_or_path} "
                                      "does not render this reply's content as written")


@pytest.mark.parametrize("key", [{"train": False}, {"weight": 0}])
def test_a_turn_can_be_left_out_of_training(tokenizers, key):
    messages = conversation([(Q1, A1), (Q2, A2)])
    messages[1].update(key)
    example = row_to_example({"messages": messages}, "messages")
    ids, labels = Tokenization.for_tokenizer(tokenizers["qwen2.5"], "completions").encode(example)
    expected = RENDER["qwen2.5"]([(Q1, A1), (Q2, A2)]).replace(f"[[{A1}<|im_end|>]]", f"{A1}<|im_end|>", 1)
    assert marked(tokenizers["qwen2.5"], ids, labels) == expected
    assert "train" not in str(tokenizers["qwen2.5"].apply_chat_template(example["messages"], tokenize=False))


def test_assistant_turns_in_a_conversational_prompt_are_context():
    row = {"prompt": conversation([(Q1, A1)]) + [{"role": "user", "content": Q2}],
           "completion": [{"role": "assistant", "content": A2}]}
    messages = row_to_example(row, "prompt_completion")["messages"]
    assert [m.get("train", True) for m in messages if m["role"] == "assistant"] == [False, True]


@pytest.mark.parametrize("message, problem", [
    ({"role": "assistant", "content": "x", "weight": 0.5}, "'weight' must be 0 (leave the turn out) or 1"),
    ({"role": "user", "content": "x", "train": True}, "only assistant turns are trained"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "'arguments' is not valid JSON"),
])
def test_bad_message_keys_are_named(message, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        row_to_example({"messages": [{"role": "user", "content": "hi"}, message,
                                     {"role": "assistant", "content": "ok"}]}, "messages")


# ---------------------------------------------------------------- validate, and sft end to end on every family

def all_rows(name: str) -> list[dict]:
    """The family's conversation cases as one messages data file holds them."""
    return [row for _, fmt, row, _ in cases(name) if fmt == "messages"]


def family_recipe(tmp_path, model, rows, steps: int = 2):
    from conftest import fast_training

    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {model}\ndata:\n  train:\n    - path: {data}\n  max_length: 512\n"
                      + fast_training(tmp_path / "out", steps).replace("per_device_train_batch_size: 8",
                                                                        "per_device_train_batch_size: 4"))
    return recipe


def run_cli(*args):
    from click.testing import CliRunner

    from lorakit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_validate_has_no_false_alarm_on_qwen3s_empty_think_block(tmp_path):
    from chat_template_families import build_model

    model = build_model(tmp_path / "qwen3", FAMILIES["qwen3"])
    result = run_cli("validate", family_recipe(tmp_path, model, all_rows("qwen3")), "--samples", "1")
    assert result.exit_code == 0, result.output
    assert "no token of a system or user message is trained" in result.output
    assert "'<|im_end|>' is trained at the end of every assistant reply" in result.output
    assert "[[<think>\n\n</think>\n\nThe sky is blue.<|im_end|>]]" in result.output.replace("\n    ", "\n")


def test_validate_fails_showing_the_row_when_the_template_never_closes_a_reply(tmp_path):
    from chat_template_families import build_model

    model = build_model(tmp_path / "qwen2.5", FAMILIES["qwen2.5"])
    template = (model / "chat_template.jinja").read_text()
    closing = "message.content + '<|im_end|>' + '\\n'"
    assert closing in template
    broken = template.replace(closing, "message.content + ('\\n' if message.role == 'assistant' else '<|im_end|>\\n')")
    (model / "chat_template.jinja").write_text(broken)
    recipe = family_recipe(tmp_path, model, [{"messages": conversation([(Q1, A1)])}])
    result = run_cli("validate", recipe, "--samples", "0")
    assert result.exit_code == 1, result.output
    out = result.output
    assert (f"is not trained at the end of every assistant reply in 1 of 1 rows (first: {tmp_path / 'train.jsonl'} "
            "row 1): the chat template does not put it after the reply at all") in out
    # The row, as trained: the reply ends without any end-of-turn token.
    assert "That row as trained (trained tokens between [[ and ]]):" in out
    assert f"<|im_start|>assistant\n[[{A1}]]" in out.replace("\n" + " " * 13, "\n").replace("\n" + " " * 2, "\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sft_on_each_family_saves_a_tokenizer_that_renders_training_identically(tmp_path, name):
    from transformers import AutoTokenizer, GenerationConfig

    from chat_template_families import build_model
    from lorakit.models.loading import load_tokenizer

    family = FAMILIES[name]
    model = build_model(tmp_path / name, family)
    rows = all_rows(name)
    recipe = family_recipe(tmp_path, model, rows)
    validated = run_cli("validate", recipe, "--samples", "0")
    assert validated.exit_code == 0, validated.output
    result = run_cli("sft", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    trained_with, _ = load_tokenizer({"name_or_path": str(model)})
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.eos_token == family.eos and saved.bos_token == family.bos
    for row in rows:
        tools = row.get("tools")
        assert saved.apply_chat_template(row["messages"], tools=tools, tokenize=False) == \
            trained_with.apply_chat_template(row["messages"], tools=tools, tokenize=False)
        assert saved.apply_chat_template(row["messages"], tools=tools, return_dict=True)["input_ids"] == \
            trained_with.apply_chat_template(row["messages"], tools=tools, return_dict=True)["input_ids"]
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert saved.convert_tokens_to_ids(family.end_of_turn) in stops and saved.eos_token_id in stops


@pytest.mark.slow
def test_generation_stops_at_the_end_of_turn_on_the_run_folder_and_the_merged_model(tiny_llama, tmp_path):
    """The tiny ChatML base's own generation config stops at EOS only; the run's generation_config.json and the
    merged model's add the template's <|im_end|>. The model is pushed to write <|im_end|> first (sequence_bias)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

    recipe = family_recipe(tmp_path, tiny_llama, [{"messages": conversation([(Q1, A1)])}] * 4)
    assert run_cli("sft", recipe).exit_code == 0
    run = tmp_path / "out"
    merged = tmp_path / "merged"
    merge = run_cli("merge", run, "--output", merged)
    assert merge.exit_code == 0, merge.output
    tokenizer = AutoTokenizer.from_pretrained(run)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end not in [GenerationConfig.from_pretrained(tiny_llama).eos_token_id]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": Q1}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    push = {"sequence_bias": {(end,): 100.0}, "max_new_tokens": 8, "do_sample": False}
    with torch.inference_mode():
        on_run = AutoModelForCausalLM.from_pretrained(run).generate(
            **prompt, generation_config=GenerationConfig.from_pretrained(run), **push)
        on_merged = AutoModelForCausalLM.from_pretrained(merged).generate(**prompt, **push)
    for output in (on_run, on_merged):
        assert output[0, prompt["input_ids"].shape[1]:].tolist() == [end]  # stopped right after <|im_end|>
    generator = pipeline("text-generation", model=str(merged))
    reply = generator([{"role": "user", "content": Q1}], **push)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"] == ""  # <|im_end|> ended it, nothing after
