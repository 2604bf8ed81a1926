"""loss.png: the run's training and eval loss and learning rate against the step, in the run folder after every
run and when a run is stopped; tensorboard event files when the recipe reports there (offline)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import facts_rows, fast_training, write_jsonl
from lorakit.errors import RunInterrupted
from lorakit.training import plots, run_dir

HISTORY = [{"loss": 3.0 - step / 10, "learning_rate": 1e-3 * (1 - step / 20), "step": step} for step in range(1, 21)]
HISTORY += [{"eval_loss": 2.5, "step": 10}, {"eval_loss": 2.1, "step": 20}, {"train_runtime": 3.0, "step": 20}]


def test_the_plot_is_a_png_of_the_logged_curves(tmp_path):
    import matplotlib.image

    path = plots.write_loss_plot(tmp_path, HISTORY, "run")
    assert path == tmp_path / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (800, 450)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no partial file left behind
    assert plots.series(HISTORY, "eval_loss") == ([10, 20], [2.5, 2.1])


def test_nothing_logged_draws_nothing(tmp_path):
    assert plots.write_loss_plot(tmp_path, [{"train_runtime": 1.0, "step": 3}]) is None
    assert not (tmp_path / "loss.png").exists()


def write_recipe(tmp_path: Path, model: Path, steps: int, extra: str = "") -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\ndata:\n  train: {data}\n  max_length: 64\n"
                      + fast_training(tmp_path / "out", steps=steps) + extra)
    return recipe


class StopAtStep:
    """Sends this process SIGTERM at a step, as a scheduler preempting the job would."""

    def __init__(self, step: int):
        self.step = step

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_loss_png_after_a_run_and_after_an_interruption(tiny_llama, tmp_path):
    from lorakit.commands.sft import build_sft, run_sft
    from lorakit.training import lifecycle

    out = run_sft(str(write_recipe(tmp_path, tiny_llama, steps=4)))
    assert (out / "loss.png").is_file() and "(loss.png)" in (out / "README.md").read_text()

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    recipe = write_recipe(stopped, tiny_llama, steps=8, extra="  save_strategy: steps\n  save_steps: 2\n")
    recipe.write_text(recipe.read_text().replace('  save_strategy: "no"\n', ""))
    with pytest.raises(RunInterrupted):
        lifecycle.run_recipe("sft", recipe, (), build_sft, callbacks=(StopAtStep(3),))
    assert run_dir.read_record(stopped / "out")["status"] == run_dir.INTERRUPTED
    assert (stopped / "out" / "loss.png").is_file()


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files_offline(tiny_llama, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extras: pip install -e '.[test]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.commands.sft import run_sft

    out = run_sft(str(write_recipe(tmp_path, tiny_llama, steps=3, extra="  report_to: tensorboard\n")))
    events = list((out / "runs").rglob("events.out.tfevents.*"))  # transformers' default: OUTPUT_DIR/runs/
    assert events, list(out.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    logged = [entry["loss"] for entry in run_dir.read_record(out)["log_history"] if "loss" in entry]
    assert losses == pytest.approx(logged, rel=1e-5)
