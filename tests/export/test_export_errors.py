"""Every refusal of lorakit export is one line naming the problem and the fix, before any model is loaded, and
leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lorakit.cli import main


@pytest.fixture
def folder(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    return run


def refusal(tmp_path: Path, *args) -> str:
    before = set(tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message, message
    assert set(tmp_path.rglob("*")) == before  # nothing written, nothing half-written
    return message


def test_without_the_converter_the_fix_is_named(folder, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAKIT_LLAMA_CPP", raising=False)
    message = refusal(tmp_path, folder, "--to", "gguf")
    assert "LORAKIT_LLAMA_CPP" in message and "lorakit[export]" in message and "docs/export.md" in message


def test_a_folder_without_the_converter_is_refused(folder, tmp_path, monkeypatch):
    empty = tmp_path / "not-llama-cpp"
    empty.mkdir()
    monkeypatch.setenv("LORAKIT_LLAMA_CPP", str(empty))
    assert "holds no convert_hf_to_gguf.py" in refusal(tmp_path, folder, "--to", "ollama")


def test_an_unknown_quantization_lists_the_known_ones(folder, tmp_path):
    message = refusal(tmp_path, folder, "--to", "gguf", "--quant", "q4_k_x")
    assert "q4_k_x" in message and "q8_0" in message and "q4_k_m" in message


def test_a_k_quant_without_llama_quantize_says_how_to_build_it(folder, tmp_path, monkeypatch):
    sources = tmp_path / "llama.cpp"
    sources.mkdir()
    (sources / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("LORAKIT_LLAMA_CPP", str(sources))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    message = refusal(tmp_path, folder, "--to", "gguf", "--quant", "q4_k_m")
    assert "llama-quantize" in message and "cmake" in message and "q8_0" in message


@pytest.mark.parametrize("args, expected", [
    (["--to", "vllm", "--quant", "q8_0"], "--quant is for"),
    (["--to", "ollama", "--adapter-only"], "--adapter-only is for"),
])
def test_options_that_do_not_fit_the_format(folder, tmp_path, args, expected):
    assert expected in refusal(tmp_path, folder, *args)


def test_an_existing_output_is_never_overwritten(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists and is not empty" in refusal(tmp_path, folder, "--to", "vllm", "--output", out)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_missing_source_is_named(tmp_path):
    assert "no such run or model folder" in refusal(tmp_path, tmp_path / "nope", "--to", "gguf")
