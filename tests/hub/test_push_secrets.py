"""`lorakit push` finds a token however a file writes it: after an escaped newline, behind a JSON or YAML escape, in
a safetensors header. The push stops before any request, names the file, and never shows the token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hub_server import Account, FakeHub

from lorakit.cli import main


def fake_token(label: str) -> str:
    return "hf_" + label + "Q" * (34 - len(label))


ENV_TOKEN = fake_token("InTheEnvironment")
STRAY_TOKEN = fake_token("SomeoneElsesLogin")


def escaped(token: str) -> str:
    """The token as JSON may write it: every character a \\u escape, so the raw bytes hold no 'hf_' at all."""
    return "".join(f"\\u{ord(c):04x}" for c in token)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = FakeHub({ENV_TOKEN: Account("alice")}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield server
    server.stop()


@pytest.fixture
def run_folder(tiny_llama, tmp_path) -> Path:
    """A finished run's files, written directly (no trained weights needed to check what would go up)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_llama / name, folder / name)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama),
                                                            "peft_type": "LORA", "r": 4}))
    save_file({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), dtype=np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "lorakit_recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_llama)}, "lora": {"r": 4},
        "data": {"train": [{"path": str(tmp_path / "train.jsonl")}]}, "training": {"max_steps": 3}}))
    (folder / "lorakit_run.json").write_text(json.dumps({"status": "completed", "metrics": {"train_loss": 2.5}}))
    return folder


def push(folder: Path):
    return CliRunner().invoke(main, ["push", str(folder), "--repo", "alice/facts-lora"])


def refused(result, file: str, told: str, tokens=(ENV_TOKEN, STRAY_TOKEN)) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{file} in " in last and told in last and "nothing was uploaded" in last
    assert not any(token in result.output for token in tokens)


def test_a_token_after_an_escaped_newline_in_the_eval_report_is_found(run_folder, hub):
    # What a user's note in an eval report looks like once json.dumps has written it: "...:\nhf_..."
    report = {"metrics": {"model": {"exact_match": 0.9}}, "notes": f"my login:\n{STRAY_TOKEN}"}
    (run_folder / "lorakit_eval.json").write_text(json.dumps(report))
    assert f"\\n{STRAY_TOKEN}" in (run_folder / "lorakit_eval.json").read_text()  # no word boundary before hf_
    result = push(run_folder)
    refused(result, "lorakit_eval.json", "something shaped like a Hugging Face token")
    assert hub.requests == []


@pytest.mark.parametrize("token, told", [(STRAY_TOKEN, "something shaped like a Hugging Face token"),
                                          (ENV_TOKEN, "the token from HF_TOKEN")])
def test_a_token_behind_json_escapes_is_found(run_folder, hub, token, told):
    config = json.loads((run_folder / "tokenizer_config.json").read_text())
    config["model_max_length_note"] = "PLACEHOLDER"
    text = json.dumps(config).replace("PLACEHOLDER", escaped(token))
    assert token not in text and "hf_" not in text
    (run_folder / "tokenizer_config.json").write_text(text)
    result = push(run_folder)
    refused(result, "tokenizer_config.json", told)
    assert hub.requests == []


def test_a_token_behind_a_yaml_escape_in_the_recipe_is_found(run_folder, hub):
    path = run_folder / "lorakit_recipe.yaml"
    # A double-quoted YAML string with \x escapes: the raw file never spells hf_.
    hidden = "".join(f"\\x{ord(c):02x}" for c in STRAY_TOKEN[:3]) + STRAY_TOKEN[3:]
    path.write_text(path.read_text() + f'notes: "{hidden}"\n')
    assert yaml.safe_load(path.read_text())["notes"] == STRAY_TOKEN and "hf_" not in path.read_text()
    result = push(run_folder)
    refused(result, "lorakit_recipe.yaml", "something shaped like a Hugging Face token")
    assert hub.requests == []


def test_a_token_in_safetensors_metadata_is_found(run_folder, hub):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), dtype=np.float32)},
              str(run_folder / "adapter_model.safetensors"), metadata={"note": f"from\n{STRAY_TOKEN}"})
    result = push(run_folder)
    refused(result, "adapter_model.safetensors", "something shaped like a Hugging Face token")
    assert hub.requests == []


def test_a_clean_folder_still_goes_up(run_folder, hub):
    (run_folder / "lorakit_eval.json").write_text(json.dumps({"metrics": {"model": {"exact_match": 0.9}},
                                                              "notes": "hf_short and a\nhf_ prefix are not tokens"}))
    result = push(run_folder)
    assert result.exit_code == 0, result.output
    assert "lorakit_eval.json" in hub.files("alice/facts-lora")


def write_gguf(path: Path, note: str, weights) -> None:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.description", note)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "hello", f"x{STRAY_TOKEN}"[:8]])
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("token_embd.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_token_in_gguf_metadata_is_found_without_reading_the_weights(tmp_path):
    import numpy as np

    from lorakit.errors import LorakitError
    from lorakit.hub.secrets import readings, scannable_bytes

    # 8 MB of weights whose bytes spell a token: weights are numbers, never scanned as text.
    weights = np.frombuffer((STRAY_TOKEN.encode() * 250_000)[:8_000_000], dtype=np.float32).reshape(2_000, 1_000)
    clean = tmp_path / "clean.gguf"
    write_gguf(clean, "a clean model", weights)
    header = scannable_bytes(clean)
    assert b"a clean model" in header and b"hello" in header and b"token_embd.weight" in header
    assert len(header) < 10_000 < clean.stat().st_size
    assert not any(STRAY_TOKEN in text for text in readings(clean.name, header))

    leaky = tmp_path / "leaky.gguf"
    write_gguf(leaky, f"trained with {STRAY_TOKEN}", weights[:10])
    assert any(STRAY_TOKEN in text for text in readings(leaky.name, scannable_bytes(leaky)))

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(leaky.read_bytes()[:40])
    with pytest.raises(LorakitError, match="cut.gguf is not a valid GGUF file"):
        scannable_bytes(cut)
