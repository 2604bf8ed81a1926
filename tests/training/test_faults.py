"""Faults around a run: a second writer of its folder, a read-only folder, a full disk, a damaged checkpoint, a run
that stopped learning, and --overwrite beside the user's own files. Each ends in one clear message, keeps what
the user had and what can be resumed, and is told before anything is loaded where it can be."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import facts_rows, fast_training, write_adapter_run, write_jsonl

from lorakit.cli import main
from lorakit.errors import DiskFull, OutputDirError, TrainingStalled
from lorakit.training import checkpoint_check, folder_lock, guards, run_dir

QUIET = ("training.disable_tqdm=true",)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def write_run_recipe(folder: Path, model: Path, out: Path, steps: int = 4, data: Path | None = None) -> Path:
    data = data or write_jsonl(folder / "train.jsonl", facts_rows("messages"))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {model}\ndata:\n  train:\n    - path: {data}\n  max_length: 64\n"
                      "lora:\n  r: 4\n  lora_alpha: 8\n" + fast_training(out, steps), encoding="utf-8")
    return recipe


def forbid_loading(monkeypatch) -> None:
    from lorakit.models import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded although the run could not start")

    monkeypatch.setattr(loading, "load_model", no_loading)
    monkeypatch.setattr(loading, "load_tokenizer", no_loading)


def finished_run(out: Path, recipe: Path, listed: list[str]) -> None:
    """A finished run's folder as lorakit leaves it, written directly: record, recipe, manifest, the files listed."""
    from lorakit.data import cache
    from lorakit.recipe import load_recipe

    loaded = load_recipe(recipe)
    fingerprint = run_dir.Fingerprint(loaded.fingerprint(), cache.source_fingerprints(loaded.data))
    out.mkdir(parents=True, exist_ok=True)
    run_dir.write_record(out, {"status": run_dir.COMPLETED, **fingerprint.to_record()})
    (out / run_dir.RECIPE_FILE).write_text(loaded.dump())
    for name in listed:
        (out / name).write_text("written by the run")
    (out / run_dir.MANIFEST_FILE).write_text(json.dumps({"files": listed}))


# ---------------------------------------------------------------- --overwrite and the user's files


@pytest.mark.slow
def test_overwrite_removes_only_what_the_run_wrote_and_says_what(tiny_llama, tmp_path):
    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out, steps=2)
    first = CliRunner().invoke(main, ["sft", str(recipe), *QUIET])
    assert first.exit_code == 0, first.output
    manifest = set(json.loads((out / run_dir.MANIFEST_FILE).read_text())["files"])
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", run_dir.RECORD_FILE} <= manifest
    (out / "mydata").mkdir()
    (out / "mydata" / "more.jsonl").write_text('{"text": "mine"}\n')
    (out / "notes.txt").write_text("what I tried")

    again = CliRunner().invoke(main, ["sft", str(recipe), *QUIET, "--overwrite"])
    assert again.exit_code == 0, again.output
    removed = next(line for line in again.output.splitlines() if "--overwrite: removed" in line)
    assert "adapter_model.safetensors" in removed and "notes.txt" not in removed and "mydata" not in removed
    assert "kept, as lorakit did not write them: mydata/, notes.txt" in again.output
    assert (out / "notes.txt").read_text() == "what I tried"
    assert (out / "mydata" / "more.jsonl").read_text() == '{"text": "mine"}\n'
    assert run_dir.read_record(out)["status"] == run_dir.COMPLETED and (out / "adapter_model.safetensors").is_file()


def test_overwrite_refuses_a_folder_the_recipe_reads_its_data_from(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "x"
    (out / "mydata").mkdir(parents=True)
    data = write_jsonl(out / "mydata" / "train.jsonl", facts_rows("messages", repeat=1))
    recipe = write_run_recipe(tmp_path, tiny_llama, out, data=data)
    finished_run(out, recipe, ["adapter_model.safetensors"])
    (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    forbid_loading(monkeypatch)

    result = CliRunner().invoke(main, ["sft", str(recipe), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert (f"the recipe's data {data} lies inside the output folder {out}, which --overwrite would replace; "
            "nothing was changed") in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert json.loads((out / run_dir.MANIFEST_FILE).read_text()) == {"files": ["adapter_model.safetensors"]}


def test_a_refused_run_leaves_a_folder_that_is_not_a_run_untouched(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    forbid_loading(monkeypatch)
    result = CliRunner().invoke(main, ["sft", str(write_run_recipe(tmp_path, tiny_llama, out)), "--overwrite"])
    assert result.exit_code == 2 and "is not a lorakit run" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock file left


def test_an_older_run_without_a_manifest_loses_only_lorakits_known_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", run_dir.RECORD_FILE,
                 run_dir.RECIPE_FILE, "my-analysis.ipynb"):
        (out / name).write_text("x")
    (out / "checkpoint-4").mkdir()
    run_dir.clear_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["my-analysis.ipynb"]


# ---------------------------------------------------------------- one writer per folder


HOLD = textwrap.dedent("""
    import sys, time
    from lorakit.training.folder_lock import hold_lock
    with hold_lock(sys.argv[1], "lorakit sft"):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock of a folder; yields (start(folder) -> Popen)."""
    started = []

    def start(folder: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_second_run_into_a_folder_in_use_is_refused_at_once(tiny_llama, tmp_path, holder, monkeypatch):
    out = tmp_path / "runs" / "shared"
    recipe = write_run_recipe(tmp_path, tiny_llama, out)
    process = holder(out)
    forbid_loading(monkeypatch)

    result = CliRunner().invoke(main, ["sft", str(recipe)])
    assert result.exit_code == 2, result.output
    assert (f"{out} is in use by lorakit sft (pid {process.pid} on host {socket.gethostname()}, since "
            in result.output) and "nothing was changed" in result.output
    assert not out.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tmp_path, holder, capsys):
    folder = tmp_path / "out"
    process = holder(folder)
    with pytest.raises(OutputDirError, match=f"pid {process.pid}"):
        with folder_lock.hold_lock(folder, "lorakit sft"):
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert folder_lock.lock_path(folder).exists()  # what a killed process leaves behind

    with folder_lock.hold_lock(folder, "lorakit merge"):
        told = capsys.readouterr().err
        assert f"taking over the lock of {folder} left by lorakit sft (pid {process.pid}" in told
        assert "no longer running" in told
    assert not folder_lock.lock_path(folder).exists()  # released cleanly: removed


def test_a_merge_into_a_folder_another_merge_writes_is_refused(tiny_llama, tmp_path, holder):
    run = write_adapter_run(tmp_path / "run", tiny_llama)
    out = tmp_path / "merged"
    process = holder(out)
    result = CliRunner().invoke(main, ["merge", str(run), "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert f"{out} is in use by lorakit sft (pid {process.pid}" in result.output
    assert not out.exists()



def test_an_export_into_a_folder_another_process_writes_is_refused(tiny_llama, tmp_path, holder):
    run = write_adapter_run(tmp_path / "run", tiny_llama)
    out = tmp_path / "served"
    process = holder(out)
    result = CliRunner().invoke(main, ["export", str(run), "--to", "vllm", "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert f"{out} is in use by lorakit sft (pid {process.pid}" in result.output
    assert not out.exists() and not list(tmp_path.glob(".served.partial-*"))


# ---------------------------------------------------------------- the disk


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write: by its mode, or for root (whom modes do not stop) a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root, where only a read-only mount makes a folder unwritable, and mount is refused")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_is_named_before_anything_loads(tiny_llama, tmp_path, read_only_folder,
                                                                  monkeypatch):
    forbid_loading(monkeypatch)
    for out in (read_only_folder, read_only_folder / "runs" / "x"):
        recipe = write_run_recipe(tmp_path, tiny_llama, out)
        result = CliRunner().invoke(main, ["sft", str(recipe)])
        assert result.exit_code == 2, result.output
        assert f"error: output folder {out} is not writable" in result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.slow
def test_a_full_disk_ends_in_one_message_and_the_run_resumes_once_space_is_freed(tiny_llama, tmp_path,
                                                                                 monkeypatch):
    """The disk fills while checkpoint-4 is written (after checkpoint-2 is complete): the write of the failure into
    the run record fails too, as it did for real."""
    from peft import peft_model

    from lorakit.commands.sft import run_sft

    save_file, write_record = peft_model.safe_save_file, run_dir.write_record  # peft's adapter writer
    full = {"on": False}

    def filling(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            full["on"] = True
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return save_file(tensors, filename, *args, **kwargs)

    def record_on_a_full_disk(folder, record):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_record(folder, record)

    monkeypatch.setattr(peft_model, "safe_save_file", filling)
    monkeypatch.setattr(run_dir, "write_record", record_on_a_full_disk)
    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out, steps=6)
    settings = (*QUIET, "training.save_strategy=steps", "training.save_steps=2")
    with pytest.raises(DiskFull) as error:
        run_sft(str(recipe), settings)
    message = str(error.value)
    assert message.startswith(f"the disk is full: writing {out / 'checkpoint-4' / 'adapter_model.safetensors'} "
                              "failed (")
    assert "MiB free on the disk holding" in message and "The last complete checkpoint, checkpoint-2, is kept" in message
    assert error.value.code == 5
    assert [c.name for c in run_dir.complete_checkpoints(out)] == ["checkpoint-2"]

    monkeypatch.setattr(peft_model, "safe_save_file", save_file)  # space freed
    monkeypatch.setattr(run_dir, "write_record", write_record)
    run_sft(str(recipe), settings)
    record = run_dir.read_record(out)
    assert record["status"] == run_dir.COMPLETED and record["resumed_from"] == "checkpoint-2"


@pytest.fixture
def small_disk(tmp_path):
    """A 400 kB filesystem: a tiny run's second checkpoint does not fit. Needs mount (root, unconfined)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (the simulated full disk above still runs)")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: the test process may still hold a file


@pytest.mark.slow
def test_a_really_full_disk_ends_in_one_message_and_resumes_once_grown(tiny_llama, tmp_path, small_disk):
    out = small_disk / "run"
    recipe = write_run_recipe(tmp_path, tiny_llama, out, steps=6)
    settings = (*QUIET, "training.save_strategy=steps", "training.save_steps=1", "training.save_total_limit=8")
    full = CliRunner().invoke(main, ["sft", str(recipe), *settings])
    assert full.exit_code == 5, full.output
    last = run_dir.latest_complete_checkpoint(out)
    assert last is not None and "error: the disk is full: writing " in full.output
    assert f"The last complete checkpoint, {last.name}, is kept" in full.output and "Traceback" not in full.output
    assert not list(out.glob("*.tmp"))

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    resumed = CliRunner().invoke(main, ["sft", str(recipe), *settings])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {last.name}" in resumed.output
    assert run_dir.read_record(out)["status"] == run_dir.COMPLETED


def test_disk_full_is_told_for_each_writers_own_way_of_saying_it(tmp_path):
    from lorakit.training.disk import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device", "/x/y"), tmp_path) is not None
    assert disk_full(RuntimeError("Error while serializing: No space left on device (os error 28)"), tmp_path)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("writing the record failed")  # a later error, the full disk in its context
    except RuntimeError as chained:
        assert disk_full(chained, tmp_path) is not None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_full(ValueError("bad value"), tmp_path) is None


# ---------------------------------------------------------------- damaged checkpoints


def saved_checkpoint(folder: Path, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "optimizer.pt").write_bytes(bytes(range(200)))
    run_dir.mark_complete(checkpoint, step)
    return checkpoint


def garble(path: Path) -> None:
    """Same size, other bytes: what a bad disk or copy leaves, which a size check cannot see."""
    path.write_bytes(os.urandom(path.stat().st_size))


def test_a_damaged_checkpoint_is_found_by_its_checksums_and_by_its_header(tmp_path):
    sound, damaged = saved_checkpoint(tmp_path, 2), saved_checkpoint(tmp_path, 4)
    garble(damaged / "optimizer.pt")
    assert checkpoint_check.checkpoint_damage(sound) is None
    assert run_dir.is_complete(damaged)  # the size check alone trusts it
    assert (checkpoint_check.checkpoint_damage(damaged)
            == "optimizer.pt does not match the sha256 taken when it was saved")
    assert checkpoint_check.latest_sound_checkpoint(tmp_path) == sound

    older = saved_checkpoint(tmp_path / "older", 6)  # a checkpoint saved before checksums existed
    (older / run_dir.CHECKSUMS).unlink()
    garble(older / "adapter_model.safetensors")
    assert checkpoint_check.checkpoint_damage(older).startswith("adapter_model.safetensors: not a safetensors file")


@pytest.mark.slow
def test_resume_falls_back_from_a_damaged_newest_checkpoint_with_a_warning(tiny_llama, tmp_path, monkeypatch):
    from lorakit.commands.sft import run_sft

    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out, steps=6)
    settings = (*QUIET, "training.save_strategy=steps", "training.save_steps=2")
    stop_after(monkeypatch, 4)
    with pytest.raises(guards.RunInterrupted):
        run_sft(str(recipe), settings)
    monkeypatch.undo()
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    assert [c.name for c in run_dir.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    garble(out / "checkpoint-4" / "adapter_model.safetensors")

    result = CliRunner().invoke(main, ["sft", str(recipe), *settings])
    assert result.exit_code == 0, result.output
    assert ("lorakit: warning: checkpoint-4 is damaged (adapter_model.safetensors does not match the sha256 taken "
            "when it was saved): removed; falling back to the checkpoint before it") in result.output
    assert "resuming from checkpoint-2" in result.output
    assert run_dir.read_record(out)["resumed_from"] == "checkpoint-2"


def stop_after(monkeypatch, step: int) -> None:
    """SIGTERM to this process when `step` ends, as a scheduler would send it."""
    from lorakit.training import lifecycle

    class SignalAtStep(guards.Callback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step - 1:  # lorakit's guard saves and stops at the end of the next step
                os.kill(os.getpid(), signal.SIGTERM)

    build_callbacks = lifecycle.build_callbacks
    monkeypatch.setattr(lifecycle, "build_callbacks", lambda recipe, stop: [*build_callbacks(recipe, stop),
                                                                            SignalAtStep()])


# ---------------------------------------------------------------- a run that stopped learning


@pytest.mark.slow
def test_a_run_that_stopped_learning_stops_like_a_divergence_and_push_refuses_it(tiny_llama, tmp_path,
                                                                                  monkeypatch):
    from lorakit.commands.sft import run_sft

    monkeypatch.setattr(guards, "STALL_STEPS", 4)  # 10 in real runs; 4 keeps the test short
    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out, steps=12)
    with pytest.raises(TrainingStalled) as stalled:
        run_sft(str(recipe), (*QUIET, "training.learning_rate=1e8"))
    message = str(stalled.value)
    # step 1 saturates the model; from step 2 on every gradient is exactly 0
    assert message.startswith("training stalled at step 5: the gradient norm has been exactly 0 for 4 optimizer "
                              "steps in a row (since step 2); the loss sits at ")
    assert "ln of the vocabulary size" in message and "training.learning_rate is 1e+08" in message
    assert stalled.value.code == 3
    record = run_dir.read_record(out)
    assert record["status"] == run_dir.FAILED and record["failure"]["reason"] == "stalled"
    with pytest.raises(OutputDirError, match="failed run.*training stalled at step 5"):
        run_dir.require_completed(out)  # what push checks


class State:
    def __init__(self, step: int):
        self.global_step = step


class Args:
    learning_rate = 1e-3
    device = "cpu"


def test_a_loss_that_no_longer_moves_stops_the_run(monkeypatch):
    guard = guards.StopOnStall(steps=10)
    with pytest.raises(TrainingStalled, match=r"at step 15: the logged loss has stayed at 2.3026 since step 5 "
                                              r"\(3 logs in a row\)"):
        for step, loss in ((5, 2.30259), (10, 2.302591), (15, 2.3025899)):  # float noise only
            guard.on_log(Args(), State(step), None, logs={"loss": loss})
    live = guards.StopOnStall(steps=10)
    for step, loss in ((5, 2.3), (10, 2.1), (15, 2.1), (20, 1.9), (25, 1.9), (30, 1.9001)):
        live.on_log(Args(), State(step), None, logs={"loss": loss})  # a slow run that still learns
