"""`lorakit generate` on a model folder without a chat template says that it formats the prompt with ChatML."""

from __future__ import annotations

from click.testing import CliRunner

from lorakit.cli import main


def test_generate_says_it_uses_chatml_for_a_folder_without_a_template(tiny_llama_no_template):
    result = CliRunner().invoke(main, ["generate", str(tiny_llama_no_template), "What colour is the sky?",
                                       "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "has no chat template; prompts are formatted with lorakit's ChatML" in result.output


def test_a_folder_with_its_own_template_gets_no_such_note(tiny_llama):
    result = CliRunner().invoke(main, ["generate", str(tiny_llama), "What colour is the sky?", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "ChatML" not in result.output
