"""The Modelfile's TEMPLATE, rendered as Ollama renders Go templates (by the test's own renderer), equals the
training chat template's rendering, for real templates of several families; templates it cannot equal are
refused in one line."""

from __future__ import annotations

import pytest
from export_helpers import family_tokenizer, ollama_render, read_modelfile, trl_template

from lorakit.errors import LorakitError
from lorakit.export.ollama import find_pieces, go_template, modelfile_text

CONVERSATIONS = [
    [{"role": "user", "content": "What do bees make?"}],
    [{"role": "system", "content": "Answer briefly.\nBe kind."}, {"role": "user", "content": "Naïve café? 3 + 4"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello.\n\nHow can I help?"}, {"role": "user", "content": "Tell me a joke."}],
    [{"role": "user", "content": "First"}, {"role": "assistant", "content": "One"}, {"role": "user", "content": "Second"}],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {family: family_tokenizer(tmp_path_factory.mktemp(family), family) for family in ("llama3", "qwen2")}


def modelfile_for(tokenizer, adds_bos: bool, tmp_path):
    pieces = find_pieces(tokenizer, adds_bos)
    path = tmp_path / "Modelfile"
    path.write_text(modelfile_text("m.gguf", go_template(pieces), pieces.default_system, ["<|x|>"], "test"))
    return pieces, read_modelfile(path)


@pytest.mark.parametrize("family, template, adds_bos", [
    ("qwen2", "chatml", False),  # lorakit's own ChatML
    ("qwen2", "qwen2_5", False),  # a default system prompt when none is given
    ("llama3", "llama3_2", True),  # a dated system block always written, BOS added by the tokenizer
    ("qwen2", "phi3_5", False),  # EOS after a conversation that awaits no reply
    ("qwen2", "cohere", False),
])
def test_the_template_renders_what_training_rendered(tokenizers, family, template, adds_bos, tmp_path):
    from lorakit.models.loading import shipped_chat_template

    tokenizer = tokenizers[family]
    tokenizer.chat_template = shipped_chat_template("chatml") if template == "chatml" else trl_template(template)
    pieces, modelfile = modelfile_for(tokenizer, adds_bos, tmp_path)
    bos = tokenizer.bos_token if adds_bos else ""
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # llama.cpp adds BOS itself when the tokenizer does (tokenizer.ggml.add_bos_token): the TEMPLATE omits it
        assert bos + ollama_render(modelfile["TEMPLATE"], messages, modelfile["SYSTEM"]) == expected
    if template == "qwen2_5":
        assert modelfile["SYSTEM"] and "Qwen" in modelfile["SYSTEM"]
    if adds_bos:
        assert not modelfile["TEMPLATE"].startswith(tokenizer.bos_token)


def test_a_template_without_a_system_role_passes_none(tokenizers, tmp_path):
    tokenizer = tokenizers["qwen2"]
    tokenizer.chat_template = trl_template("gemma")
    pieces, modelfile = modelfile_for(tokenizer, False, tmp_path)
    assert pieces.system_mode == "none" and ".System" not in modelfile["TEMPLATE"]
    for messages in (CONVERSATIONS[0], CONVERSATIONS[3]):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(modelfile["TEMPLATE"], messages, None) == expected


@pytest.mark.parametrize("template, reason", [
    ("gemma3", "system prompt"),  # writes the system prompt into the first user turn
    ("deepseek_r1_distill", "generation prompt"),  # rewrites earlier replies
])
def test_templates_that_do_not_render_message_by_message_are_refused(tokenizers, template, reason):
    tokenizer = tokenizers["qwen2"]
    tokenizer.chat_template = trl_template(template)
    with pytest.raises(LorakitError) as error:
        find_pieces(tokenizer, False)
    message = str(error.value)
    assert "\n" not in message and reason in message and "Ollama TEMPLATE" in message
