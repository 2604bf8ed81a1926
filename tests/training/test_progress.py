"""The training log a person reads: one plain line per logged step with step, loss, learning rate, tokens/s and
time left; no escape codes outside a terminal; a last line that compares logged windows honestly."""

from __future__ import annotations

import io
import warnings
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from conftest import facts_rows, fast_training, write_jsonl
from lorakit.cli import main
from lorakit.training import progress


def drive(callback: progress.Progress, logs: list[tuple[int, dict]], max_steps: int) -> None:
    """Feed the callback the events a Trainer sends, one optimizer step at a time."""
    state = SimpleNamespace(global_step=0, max_steps=max_steps, is_world_process_zero=True, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, max_steps + 1):
        state.global_step = step
        callback.on_step_end(None, state, None)
        for at, entry in logs:
            if at == step:
                callback.on_log(None, state, None, logs=entry)


def test_one_line_per_logged_step_with_what_a_person_watches():
    lines: list[str] = []
    trl_logs = [(10, {"loss": 2.3456, "learning_rate": 1.9e-3, "num_tokens": 5000.0, "grad_norm": 0.5}),
                (15, {"eval_loss": 2.2104, "eval_runtime": 0.3}),
                (20, {"loss": 2.0012, "learning_rate": 1.1e-3, "num_tokens": 10000.0}),
                (30, {"train_runtime": 12.0, "train_loss": 2.1})]
    drive(progress.Progress(echo=lines.append, colour=False), trl_logs, max_steps=30)

    logged = [line for line in lines if " loss " in line]
    assert logged[0].startswith("  step 10/30  loss 2.3456  lr 1.90e-03  ")
    assert "tok/s" in logged[0] and "ETA" in logged[0]
    assert lines.count("  step 15/30  eval loss 2.2104") == 1
    assert logged[-1].startswith("  step 20/30  loss 2.0012  eval 2.2104  lr 1.10e-03")
    assert any(line.startswith("  time ") and "for 30 steps" in line for line in lines)  # measured early on
    assert not any("train_runtime" in line or "{" in line or "\x1b" in line for line in lines)


def test_colour_only_at_a_terminal_and_never_with_no_color(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert progress.use_colour(Terminal()) and not progress.use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not progress.use_colour(Terminal())
    lines: list[str] = []
    drive(progress.Progress(echo=lines.append), [(1, {"loss": 1.0})], max_steps=2)
    assert lines and "\x1b" not in "".join(lines)


def test_the_last_line_compares_first_and_last_logged_windows():
    history = [{"loss": 4.9974, "step": 25}, {"train_runtime": 30.0, "step": 30}]
    single = progress.final_line({"train_runtime": 30.0}, history)
    assert "loss 4.9974 (steps 1-25, the only logged window" in single and "->" not in single
    history = [{"loss": 6.0, "step": 10}, {"loss": 5.5, "step": 20}, {"loss": 5.25, "step": 30},
               {"eval_loss": 5.4, "step": 30}]
    assert progress.final_line({"eval_loss": 5.4}, history) == \
        "lorakit: loss 6.0000 (steps 1-10) -> 5.2500 (steps 21-30), eval loss 5.4000"


def test_upstream_noise_is_silenced_and_real_warnings_are_not():
    from lorakit.models.loading import quiet_upstream_logs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_upstream_logs()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]


@pytest.mark.slow
def test_a_real_run_logs_readable_lines_without_dicts_or_escape_codes(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_llama}\ndata:\n  train: {data}\n  eval_fraction: 0.25\n  max_length: 64\n"
                      + fast_training(tmp_path / "out", steps=6))
    result = CliRunner().invoke(main, ["sft", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    step_lines = [line for line in lines if line.startswith("  step ") and "  loss " in line]
    assert [line.split()[1] for line in step_lines] == [f"{step}/6" for step in range(1, 7)]
    assert all("tok/s" in line for line in step_lines)
    assert "{'loss'" not in result.output and "\x1b[" not in result.output
    assert any(line.startswith("  memory ") and "estimate" in line for line in lines)
    final = next(line for line in reversed(lines) if line.startswith("lorakit: loss "))
    assert final.startswith("lorakit: loss ") and "(step 1) -> " in final and "(step 6)" in final
    assert "eval loss" in final and "peak memory" in final
