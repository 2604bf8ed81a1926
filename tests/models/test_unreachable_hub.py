"""With the Hub on but unreachable, lorakit says so at once (or uses the cached copy) instead of retrying for
minutes; and the parameter count of a QLoRA model counts weights, not packed bytes."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from lorakit.errors import LorakitError
from lorakit.models import loading


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_ENDPOINT on a local port nothing listens on; the Hub switched on."""
    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again on leaving: connecting to it is refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", {})
    return constants


def test_an_unreachable_hub_fails_fast_with_what_to_do(unreachable_hub):
    started = time.monotonic()
    with pytest.raises(LorakitError) as info:
        loading.load_tokenizer({"name_or_path": "someone/not-downloaded"})
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "cannot reach http://127.0.0.1" in message and "not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message


def test_an_unreachable_hub_falls_back_to_the_cached_copy(unreachable_hub, tiny_llama, tmp_path, monkeypatch,
                                                          capsys):
    commit = "0" * 40
    repo = tmp_path / "models--someone--cached"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(unreachable_hub, "HF_HUB_CACHE", str(tmp_path))

    tokenizer, _ = loading.load_tokenizer({"name_or_path": "someone/cached"})

    assert tokenizer.eos_token == "<|endoftext|>"
    assert unreachable_hub.HF_HUB_OFFLINE is True  # this process now reads the cache only
    assert "using the copy of someone/cached in the local Hugging Face cache" in capsys.readouterr().err


@pytest.mark.slow
def test_qlora_trainable_of_total_counts_real_parameters(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    for storage in ("uint8", "float32"):  # lorakit stores 4-bit weights in the compute dtype (FSDP needs that)
        placement = loading.Placement("cpu", "float32", "sdpa", "CPU")
        model = loading.load_model({"name_or_path": str(tiny_llama)},
                                   {"load_in_4bit": True, "bnb_4bit_quant_storage": storage}, placement)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        trainable, total = loading.count_parameters(model)
        assert total == plain + trainable, storage
