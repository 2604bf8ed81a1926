"""Exact resume for `lorakit dpo`: a DPO run on an SFT run's adapter, stopped by SIGTERM and run again, ends with
the losses, rewards and adapter of the run never stopped (the reference copy is rebuilt from the SFT run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import FACTS, assert_same_adapter, fast_training, interrupt_after, subprocess_env, write_adapter_run, write_jsonl

from lorakit.training import run_dir

STEPS = 8  # two epochs of 4 steps over 32 pairs: the resume lands mid-epoch and crosses an epoch boundary


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory) -> Path:
    return write_adapter_run(tmp_path_factory.mktemp("runs") / "sft", tiny_llama)


def write_run_recipe(folder: Path, start: Path, out: Path) -> Path:
    pairs = []
    for index, (question, answer) in enumerate(FACTS * 4):
        user = {"role": "user", "content": question}
        pairs.append({"chosen": [user, {"role": "assistant", "content": answer}],
                      "rejected": [user, {"role": "assistant", "content": FACTS[(index + 3) % len(FACTS)][1]}]})
    data = write_jsonl(folder / "pairs.jsonl", pairs)
    recipe = folder / "dpo.yaml"
    recipe.write_text(f"# lorakit dpo dpo.yaml\nmodel:\n  name_or_path: {start}\ndata:\n  train:\n    - path: {data}\n"
                      "  max_length: 64\n" + fast_training(out, STEPS).replace("5.0e-3", "1.0e-3"), encoding="utf-8")
    return recipe


def history(out: Path, key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in run_dir.read_record(out)["log_history"] if key in entry]


@pytest.fixture(scope="module")
def uninterrupted(sft_run, tmp_path_factory) -> Path:
    from lorakit.commands.dpo import run_dpo

    folder = tmp_path_factory.mktemp("uninterrupted")
    out = folder / "out"
    run_dpo(str(write_run_recipe(folder, sft_run, out)), ("training.disable_tqdm=true",))
    return out


@pytest.mark.slow
def test_sigterm_then_rerun_gives_the_uninterrupted_dpo_run(sft_run, uninterrupted, tmp_path):
    from click.testing import CliRunner

    from lorakit.cli import main

    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, sft_run, out)
    interrupt_after([sys.executable, "-m", "lorakit", "dpo", str(recipe), "training.disable_tqdm=true"],
                    subprocess_env(tmp_path), 3)
    stopped = run_dir.read_record(out)["interrupted"]["step"]
    assert 3 <= stopped < STEPS

    result = CliRunner().invoke(main, ["dpo", str(recipe), "training.disable_tqdm=true"])
    assert result.exit_code == 0, result.output
    assert f"resuming from checkpoint-{stopped}" in result.output
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert history(out, key) == history(uninterrupted, key), key
    assert len(history(out, "loss")) == STEPS
    assert_same_adapter(out, uninterrupted)
