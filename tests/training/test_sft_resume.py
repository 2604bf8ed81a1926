"""Exact resume: a run stopped by SIGTERM, or killed while saving a checkpoint, ends the same as one never stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (assert_same_adapter, facts_rows, fast_training, interrupt_after, logged_losses,
                      subprocess_env, write_jsonl)

from lorakit.training import run_dir
from lorakit.errors import OutputDirError

STEPS = 8  # two epochs of 4 steps over the 32 fact rows: a resume lands mid-epoch and across an epoch boundary


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def write_run_recipe(folder: Path, model: Path, out: Path) -> Path:
    data = write_jsonl(folder / "train.jsonl", facts_rows("messages"))
    recipe = folder / "recipe.yaml"
    # LoRA dropout on, so the comparison also covers the restored random state, not only weights and optimizer.
    recipe.write_text(f"""\
model:
  name_or_path: {model}
data:
  train:
    - path: {data}
  max_length: 64
lora:
  r: 4
  lora_alpha: 8
  lora_dropout: 0.1
""" + fast_training(out, STEPS), encoding="utf-8")
    return recipe


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory) -> Path:
    from lorakit.commands.sft import run_sft

    folder = tmp_path_factory.mktemp("uninterrupted")
    out = folder / "out"
    run_sft(str(write_run_recipe(folder, tiny_llama, out)), ("training.disable_tqdm=true",))
    return out


@pytest.mark.slow
def test_sigterm_then_rerun_gives_the_uninterrupted_losses_and_adapter(tiny_llama, uninterrupted, tmp_path):
    from click.testing import CliRunner

    from lorakit.cli import main

    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out)
    # Stopped after step 3, part-way through the first epoch.
    err = interrupt_after([sys.executable, "-m", "lorakit", "sft", str(recipe), "training.disable_tqdm=true"],
                          subprocess_env(tmp_path), 3)
    record = run_dir.read_record(out)
    assert record["status"] == run_dir.INTERRUPTED
    stopped = record["interrupted"]["step"]
    assert 3 <= stopped < STEPS and record["interrupted"]["signal"] == "SIGTERM"
    assert f"stopped by SIGTERM at step {stopped} of {STEPS}" in err
    assert [c.name for c in run_dir.complete_checkpoints(out)] == [f"checkpoint-{stopped}"]

    result = CliRunner().invoke(main, ["sft", str(recipe), "training.disable_tqdm=true"])
    assert result.exit_code == 0, result.output
    assert f"resuming from checkpoint-{stopped}" in result.output
    # Same model, optimizer, scheduler, RNG and data position: on CPU the arithmetic is identical, so bitwise.
    assert logged_losses(out) == logged_losses(uninterrupted)
    assert len(logged_losses(out)) == STEPS
    assert_same_adapter(out, uninterrupted)
    assert run_dir.read_record(out)["status"] == run_dir.COMPLETED
    assert not run_dir.checkpoints(out)


STALL_DURING_SAVE = """
import pathlib, sys, time
from transformers import Trainer
from lorakit.commands.sft import run_sft

save_rng_state = Trainer._save_rng_state  # written after the adapter, optimizer and scheduler of a checkpoint
def stall(self, output_dir):
    if self.state.global_step == {stall_at}:
        pathlib.Path({flag!r}).write_text(output_dir)
        time.sleep(600)
    return save_rng_state(self, output_dir)
Trainer._save_rng_state = stall
run_sft({recipe!r}, ("training.disable_tqdm=true", "training.save_strategy=steps", "training.save_steps=3"))
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_leaves_nothing_resume_would_trust(tiny_llama, uninterrupted, tmp_path):
    from transformers import Trainer

    from lorakit.commands.sft import run_sft

    assert hasattr(Trainer, "_save_rng_state")  # the hook this test stalls on
    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out)
    flag = tmp_path / "saving"
    script = STALL_DURING_SAVE.format(stall_at=6, flag=str(flag), recipe=str(recipe))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=subprocess_env(tmp_path))
    deadline = time.time() + 300
    while not flag.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flag.exists(), process.stderr.read()[-2000:] if process.poll() is not None else "timed out"
    process.kill()  # SIGKILL: nothing of lorakit runs after this
    process.wait(timeout=60)
    process.stderr.close()

    half_saved = out / "checkpoint-6"
    assert (half_saved / "optimizer.pt").is_file() and not run_dir.is_complete(half_saved)
    assert run_dir.is_complete(out / "checkpoint-3")

    run_sft(str(recipe), ("training.disable_tqdm=true", "training.save_strategy=steps", "training.save_steps=3"))
    record = run_dir.read_record(out)
    assert record["status"] == run_dir.COMPLETED and record["resumed_from"] == "checkpoint-3"
    assert logged_losses(out) == logged_losses(uninterrupted)
    assert_same_adapter(out, uninterrupted)


# ---------------------------------------------------------------- what the rerun decides, without training


def write_unfinished_run(out: Path, fingerprint: run_dir.Fingerprint, steps: tuple[int, ...] = (4,)) -> None:
    out.mkdir(parents=True)
    run_dir.write_record(out, {"status": run_dir.INTERRUPTED, **fingerprint.to_record()})
    for step in steps:
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "optimizer.pt").write_bytes(b"state")
        run_dir.mark_complete(checkpoint, step)


def test_changed_data_is_refused_by_name_unless_resume_changed(tmp_path):
    before = run_dir.Fingerprint("recipe1", {"/data/train.jsonl": "sha256:aaa"})
    after = run_dir.Fingerprint("recipe1", {"/data/train.jsonl": "sha256:bbb"})
    out = tmp_path / "out"
    write_unfinished_run(out, before)

    assert run_dir.prepare_output_dir(out, before) == "resume"
    assert run_dir.prepare_output_dir(out, before, overwrite=True) == "resume"  # --no-resume is the way to restart
    with pytest.raises(OutputDirError, match=r"different data \(train.jsonl\).*--resume-changed"):
        run_dir.prepare_output_dir(out, after)
    assert run_dir.prepare_output_dir(out, after, resume_changed=True) == "resume"
    assert run_dir.prepare_output_dir(out, after, overwrite=True) == "overwrite"
    assert run_dir.prepare_output_dir(out, before, overwrite=True, no_resume=True) == "overwrite"
    with pytest.raises(OutputDirError, match="a different recipe"):
        run_dir.prepare_output_dir(out, run_dir.Fingerprint("recipe2", before.data))
    assert (out / "checkpoint-4").is_dir()  # nothing was deleted by deciding


def test_no_resume_needs_overwrite(tmp_path):
    from lorakit.commands.sft import run_sft
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match="add --overwrite"):
        run_sft(str(tmp_path / "recipe.yaml"), no_resume=True)


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    from lorakit.training.lifecycle import find_resume_point

    out = tmp_path / "out"
    write_unfinished_run(out, run_dir.Fingerprint("r"), steps=(3, 6))
    (out / "checkpoint-9").mkdir()  # killed while saving: files but no marker
    (out / "checkpoint-9" / "optimizer.pt").write_bytes(b"half")
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"truncated!")  # changed since its marker was written

    assert find_resume_point(out) == out / "checkpoint-3"
    assert [c.name for c in run_dir.checkpoints(out)] == ["checkpoint-3"]


def test_pruning_keeps_complete_checkpoints_over_one_being_written(tmp_path):
    out = tmp_path / "out"
    write_unfinished_run(out, run_dir.Fingerprint("r"), steps=(2, 4))
    (out / "checkpoint-6").mkdir()  # being written: not yet marked
    run_dir.prune_checkpoints(out, keep=1)
    assert [c.name for c in run_dir.checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    run_dir.prune_checkpoints(out, keep=1, protect=out / "checkpoint-2")  # nothing left to prune but the newest
    assert (out / "checkpoint-4").is_dir()


def test_a_marker_is_the_last_thing_written_and_lists_every_file(tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    (checkpoint / "sub").mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"x" * 10)
    (checkpoint / "sub" / "rng_state.pth").write_bytes(b"y" * 3)
    run_dir.mark_complete(checkpoint, 5)
    marker = json.loads((checkpoint / run_dir.COMPLETE_MARKER).read_text())
    assert marker == {"step": 5, "files": {"optimizer.pt": 10, "sub/rng_state.pth": 3}}
    assert not list(checkpoint.glob("*.tmp"))
    run_dir.unmark(checkpoint)
    assert not run_dir.is_complete(checkpoint)


def test_resume_changed_refuses_a_different_adapter_rank(tmp_path):
    from lorakit.training.lifecycle import refuse_changed_adapter_shape
    from lorakit.errors import LorakitError

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text(json.dumps({"r": 8}))
    refuse_changed_adapter_shape(checkpoint, {"r": 8})
    with pytest.raises(LorakitError, match=r"lora.r: checkpoint-4 was trained with r=8 .* r=16"):
        refuse_changed_adapter_shape(checkpoint, {"r": 16})
