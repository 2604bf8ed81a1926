"""Divergence, out of memory, stop signals, the prepared-data cache and secrets, on a tiny model on CPU."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import CHATML, facts_rows, fast_training, write_jsonl

from lorakit.training import guards
from lorakit.training import run_dir
from lorakit.errors import LorakitError, OutputDirError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def write_run_recipe(folder: Path, model: Path, out: Path, steps: int = 6, extra_training: str = "") -> Path:
    data = write_jsonl(folder / "train.jsonl", facts_rows("messages"))
    recipe = folder / "recipe.yaml"
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
  lora_dropout: 0.0
""" + fast_training(out, steps) + extra_training, encoding="utf-8")
    return recipe


QUIET = ("training.disable_tqdm=true",)


# ---------------------------------------------------------------- divergence


@pytest.mark.slow
def test_nan_loss_stops_the_run_at_that_step_and_marks_it_failed(tiny_llama, tmp_path, monkeypatch):
    from trl import SFTTrainer

    from lorakit.commands.sft import run_sft

    compute_loss = SFTTrainer.compute_loss

    def nan_during_step_5(self, model, inputs, *args, **kwargs):
        result = compute_loss(self, model, inputs, *args, **kwargs)
        if self.state.global_step != 4:  # global_step counts finished steps: 4 while the 5th runs
            return result
        if isinstance(result, tuple):
            return (result[0] * float("nan"), *result[1:])
        return result * float("nan")

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_during_step_5)
    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out)
    with pytest.raises(guards.TrainingDiverged) as diverged:
        run_sft(str(recipe), (*QUIET, "training.save_strategy=steps", "training.save_steps=2",
                              "training.logging_steps=10"))  # found every step, not only when logging
    message = str(diverged.value)
    assert message.startswith("training diverged at step 5: the gradient norm is nan")
    assert "checkpoint-4, is kept" in message and "marked failed" in message
    assert diverged.value.code == guards.EXIT_DIVERGED

    assert [c.name for c in run_dir.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "checkpoint-5").exists()
    record = run_dir.read_record(out)
    assert record["status"] == run_dir.FAILED
    assert record["failure"]["reason"] == "diverged" and "step 5" in record["failure"]["message"]
    with pytest.raises(OutputDirError, match="failed run.*diverged at step 5"):
        run_dir.require_completed(out)  # what push and merge check


@pytest.mark.slow
def test_overflowing_learning_rate_is_caught_before_a_checkpoint_of_it(tiny_llama, tmp_path):
    from lorakit.commands.sft import run_sft

    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out)
    with pytest.raises(guards.TrainingDiverged, match=r"diverged at step \d"):
        run_sft(str(recipe), (*QUIET, "training.learning_rate=1e38", "training.max_grad_norm=0",
                              "training.save_strategy=steps", "training.save_steps=1"))
    from safetensors.torch import load_file

    for checkpoint in run_dir.complete_checkpoints(out):
        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert all(tensor.isfinite().all() for tensor in weights.values()), checkpoint.name


# ---------------------------------------------------------------- out of memory


def raise_out_of_memory_above(monkeypatch, rows: int) -> list[int]:
    """Make every micro-batch of more than `rows` sequences run out of memory, as a GPU would; log batch sizes."""
    import torch
    from trl import SFTTrainer

    seen: list[int] = []
    training_step = SFTTrainer.training_step

    def limited(self, model, inputs, *args, **kwargs):
        seen.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", limited)
    return seen


@pytest.mark.slow
def test_out_of_memory_says_what_to_change(tiny_llama, tmp_path, monkeypatch):
    from lorakit.commands.sft import run_sft

    raise_out_of_memory_above(monkeypatch, rows=4)
    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out)
    with pytest.raises(guards.OutOfMemory) as error:
        run_sft(str(recipe), (*QUIET, "training.packing=false"))
    message = str(error.value)
    assert message.startswith("out of memory at step 1 (micro-batch 8 x 64 tokens, gradient checkpointing off, "
                              "no quantization). Try, in this order:")
    assert "training.per_device_train_batch_size=4 training.gradient_accumulation_steps=2" in message
    assert "training.activation_checkpointing=true" in message
    assert "data.max_length=32" in message and "quantization.load_in_4bit=true" in message
    assert "training.auto_find_batch_size: true" in message
    assert error.value.code == guards.EXIT_OUT_OF_MEMORY
    assert run_dir.read_record(out)["failure"]["reason"] == "out of memory"


@pytest.mark.slow
def test_out_of_memory_retry_halves_the_micro_batch_and_keeps_the_global_batch(tiny_llama, tmp_path, monkeypatch):
    from lorakit.commands.sft import run_sft

    # Random order: length grouping sorts within micro-batch-sized groups, so it orders rows by micro-batch size.
    direct = tmp_path / "direct"
    run_sft(str(write_run_recipe(tmp_path, tiny_llama, direct, steps=4)),
            (*QUIET, "training.packing=false", "training.train_sampling_strategy=random",
             "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2"))

    seen = raise_out_of_memory_above(monkeypatch, rows=4)
    out = tmp_path / "retried"
    run_sft(str(write_run_recipe(tmp_path, tiny_llama, out, steps=4)),
            (*QUIET, "training.packing=false", "training.train_sampling_strategy=random",
             "training.auto_find_batch_size=true"))
    assert seen[0] == 8 and set(seen[1:]) == {4}
    record = run_dir.read_record(out)
    assert record["status"] == run_dir.COMPLETED
    assert record["micro_batch"]["per_device_train_batch_size"] == 4
    assert record["micro_batch"]["gradient_accumulation_steps"] == 2
    retried = {e["step"]: e["loss"] for e in record["log_history"] if "loss" in e}
    expected = {e["step"]: e["loss"] for e in run_dir.read_record(direct)["log_history"] if "loss" in e}
    assert list(retried) == [1, 2, 3, 4]
    # The same micro-batches, the adapter's initial weights and a fresh optimizer: the run that chose 4 x 2 itself
    assert retried == expected


def test_smaller_micro_batch_divides_the_global_batch_exactly():
    assert [guards.smaller_micro_batch(n) for n in (8, 6, 3, 12, 1)] == [4, 3, 1, 6, None]


# ---------------------------------------------------------------- stop signals


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with guards.StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop._handle(signal.SIGTERM, None)
        assert stop.received == signal.SIGTERM and exits == []
        stop._handle(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # handlers restored after training


# ---------------------------------------------------------------- the prepared-data cache


def recipe_data(path: Path) -> dict:
    return {"train": [{"path": str(path), "format": None, "columns": {}, "fraction": None, "weight": None,
                       "name": None, "split": "train", "revision": None}],
            "eval": None, "eval_fraction": None, "max_length": 64, "truncation": "truncate", "train_on": "completions"}


def test_a_changed_chat_template_is_never_served_from_the_first_runs_cache(tiny_llama, tmp_path):
    from lorakit.data import cache
    from lorakit.data import prepare_data
    from lorakit.models.loading import load_tokenizer

    data = recipe_data(write_jsonl(tmp_path / "train.jsonl", facts_rows("messages", repeat=1)))
    sources = cache.source_fingerprints(data)
    tokenizer, _ = load_tokenizer({"name_or_path": str(tiny_llama)})
    first, first_folder, cached = cache.prepare_data(data, tokenizer, 0, sources)
    assert not cached
    again, again_folder, cached = cache.prepare_data(data, tokenizer, 0, sources)
    assert cached and again_folder == first_folder and again.train["input_ids"] == first.train["input_ids"]

    # A consistent change: turns and the generation prompt both say "the <role>", so labels stay exact.
    tokenizer.chat_template = CHATML.replace("<|im_start|>' + message['role']",
                                             "<|im_start|>' + 'the ' + message['role']").replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>the assistant\\n'")
    assert tokenizer.chat_template != CHATML
    changed, changed_folder, cached = cache.prepare_data(data, tokenizer, 0, sources)
    assert not cached and changed_folder != first_folder
    assert changed.train["input_ids"] != first.train["input_ids"]
    # What training gets equals a fresh preparation with the new template: nothing stale from any cache.
    assert changed.train["input_ids"] == prepare_data(data, tokenizer, seed=0).train["input_ids"]
    assert "the user" in tokenizer.decode(changed.train[0]["input_ids"])


def test_changed_data_or_settings_change_the_cache_key(tiny_llama, tmp_path):
    from lorakit.data import cache
    from lorakit.models.loading import load_tokenizer

    path = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages", repeat=1))
    data = recipe_data(path)
    tokenizer, _ = load_tokenizer({"name_or_path": str(tiny_llama)})
    key = cache.data_key(data, 0, cache.source_fingerprints(data), tokenizer)
    assert cache.data_key({**data, "max_length": 32}, 0, cache.source_fingerprints(data), tokenizer) != key
    assert cache.data_key(data, 1, cache.source_fingerprints(data), tokenizer) != key
    write_jsonl(path, facts_rows("messages", repeat=1)[:-1])
    assert cache.data_key(data, 0, cache.source_fingerprints(data), tokenizer) != key
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert cache.data_key(data, 0, cache.source_fingerprints(data), tokenizer) != key


# ---------------------------------------------------------------- security


FAKE_TOKENS = {"env": "hf_FakeEnvToken0123456789abcdef", "recipe": "hf_FakeRecipeToken0123456789abcd",
               "cli": "hf_FakeCliToken0123456789abcdef"}


def files_holding(folder: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found += [f"{path}: {secret}" for secret in secrets if secret.encode() in content]
    return found


def stop_with_sigterm_at(monkeypatch, step: int) -> None:
    """Send this process SIGTERM when `step` ends, as a scheduler would; lorakit's handler takes it."""
    from lorakit.training import lifecycle as sft

    class SignalAtStep(guards.Callback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    build_callbacks = sft.build_callbacks
    monkeypatch.setattr(sft, "build_callbacks", lambda recipe, stop: [*build_callbacks(recipe, stop), SignalAtStep()])


@pytest.mark.slow
def test_a_planted_token_reaches_no_file_and_no_output(tiny_llama, tmp_path, monkeypatch, capfd):
    from lorakit.commands.sft import run_sft

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKENS["env"])
    out = tmp_path / "out"
    recipe = write_run_recipe(tmp_path, tiny_llama, out, steps=4)
    with_token = tmp_path / "with-token.yaml"
    with_token.write_text(recipe.read_text() + f"  hub_token: {FAKE_TOKENS['recipe']}\n")
    for path, overrides in ((with_token, QUIET), (recipe, (*QUIET, f"training.hub_token={FAKE_TOKENS['cli']}"))):
        with pytest.raises(LorakitError, match="training.hub_token: .*HF_TOKEN") as refused:
            run_sft(str(path), overrides)
        assert not any(token in str(refused.value) for token in FAKE_TOKENS.values())
    assert not out.exists()

    # A run with the token in the environment, stopped so a checkpoint (with transformers' pickled
    # training_args.bin) is on disk, then resumed to the end.
    stop_with_sigterm_at(monkeypatch, 2)
    with pytest.raises(guards.RunInterrupted):
        run_sft(str(recipe), QUIET)
    checkpoint = run_dir.read_record(out)["interrupted"]["checkpoint"]  # the signal came after lorakit's step-2 check
    assert checkpoint == "checkpoint-3" and (out / checkpoint / "training_args.bin").is_file()
    written = [out, tmp_path / "cache"]
    assert not [hit for folder in written for hit in files_holding(folder, list(FAKE_TOKENS.values()))]
    run_sft(str(recipe), QUIET)  # resumes after step 3: the step-2 signal does not come again
    assert not [hit for folder in written for hit in files_holding(folder, list(FAKE_TOKENS.values()))]
    captured = capfd.readouterr()
    assert not any(token in captured.out + captured.err for token in FAKE_TOKENS.values())
    # The finished folder holds no pickle: weights are safetensors, checkpoints are gone.
    assert not [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]


def test_refused_settings_name_the_key(tiny_llama, tmp_path):
    from lorakit.commands.sft import run_sft

    recipe = write_run_recipe(tmp_path, tiny_llama, tmp_path / "out")
    for override, expected in (
            ("training.resume_from_checkpoint=/x", "training.resume_from_checkpoint: lorakit resumes"),
            ("training.enable_jit_checkpoint=true", "training.enable_jit_checkpoint: lorakit always")):
        with pytest.raises(LorakitError, match=expected):
            run_sft(str(recipe), (override,))

    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        (pickled / name).write_text("{}")
    with pytest.raises(LorakitError, match="pytorch_model.bin.*safetensors only"):
        run_sft(str(recipe), (f"model.name_or_path={pickled}",))
    assert not (tmp_path / "out").exists()


def test_an_unwritable_cache_is_said_and_skipped(tiny_llama, tmp_path, monkeypatch, capsys):
    from lorakit.data import cache
    from lorakit.models.loading import load_tokenizer

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LORAKIT_CACHE", str(blocker))
    data = recipe_data(write_jsonl(tmp_path / "train.jsonl", facts_rows("messages", repeat=1)))
    tokenizer, _ = load_tokenizer({"name_or_path": str(tiny_llama)})
    prepared, folder, cached = cache.prepare_data(data, tokenizer, 0, cache.source_fingerprints(data))
    assert folder is None and not cached and len(prepared.train) == 8
    assert "cannot write the data cache" in capsys.readouterr().err
