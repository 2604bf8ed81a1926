"""The training log a person reads: one line per logged step, in place of transformers' progress bar and the raw
dicts it prints.

    step  25/300  loss 2.3456  eval 2.2104  lr 1.92e-03  1,234 tok/s  ETA 1m 50s

Lines are plain text: colour only on a terminal and never with NO_COLOR set, so a log file or CI output holds no
escape codes. Only the main process prints. The last line of a run compares the first and last *logged windows*
(the loss the Trainer logs is the mean over the steps since its previous log), saying which steps each covers.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import click

from lorakit.training.guards import Callback

TIMING_STEPS = 3  # steps after the first (which pays for warm-up) that the time estimate is measured over


def use_colour(stream=None) -> bool:
    """Colour only for a person at a terminal: never with NO_COLOR set (https://no-color.org), never in a file."""
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def duration(seconds: float) -> str:
    """'45 s', '3m 05s', '2h 10m'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def number(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


class Progress(Callback):
    """A Trainer callback printing one line per logging step (and per evaluation) with what a person watches:
    step of total, loss, eval loss, learning rate, tokens per second and the time left."""

    def __init__(self, echo=None, colour: bool | None = None):
        self.echo = echo or click.echo
        self.colour = use_colour() if colour is None else colour
        self.started = self.last_time = 0.0
        self.start_step = 0
        self.last_tokens: int | None = None
        self.eval_loss: float | None = None
        self.eval_at: tuple[int, float] | None = None
        self.timing: tuple[int, float] | None = None  # (step, time) where the time estimate starts measuring
        self.estimated = False

    # -- events
    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.started = self.last_time = time.monotonic()
        self.start_step = state.global_step  # > 0 when resumed: rates count only this session's steps
        self.last_tokens = None if state.global_step else 0

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        done = state.global_step - self.start_step
        if not state.is_world_process_zero or self.estimated:
            return
        if done == 1:
            self.timing = (state.global_step, time.monotonic())
        elif self.timing and done == 1 + TIMING_STEPS and state.max_steps > state.global_step:
            first, since = self.timing
            per_step = (time.monotonic() - since) / (state.global_step - first)
            remaining = per_step * (state.max_steps - state.global_step)
            elapsed = time.monotonic() - self.started
            self.estimated = True
            self.echo(f"  {'time':<13}  about {duration(elapsed + remaining)} for {state.max_steps - self.start_step} "
                      f"steps ({per_step:.2f} s per step over steps {first + 1}-{state.global_step})")

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            # The lifecycle's final evaluation repeats the last scheduled one when both fall on the last step.
            repeated = self.eval_at == (state.global_step, logs["eval_loss"])
            self.eval_loss, self.eval_at = logs["eval_loss"], (state.global_step, logs["eval_loss"])
            if "loss" not in logs and not repeated:
                self.echo(self.line(state, {"eval loss": number(logs["eval_loss"])}))
            return
        if "loss" not in logs:
            return  # the end-of-training summary (train_runtime, ...): the lifecycle prints the final line
        now = time.monotonic()
        fields = {"loss": number(logs["loss"])}
        if self.eval_loss is not None:
            fields["eval"] = number(self.eval_loss)
        if logs.get("learning_rate") is not None:
            fields["lr"] = f"{logs['learning_rate']:.2e}"
        tokens = logs.get("num_tokens") or getattr(state, "num_input_tokens_seen", 0) or None
        if tokens is not None and self.last_tokens is not None and now > self.last_time and tokens >= self.last_tokens:
            fields[""] = f"{(tokens - self.last_tokens) / (now - self.last_time):,.0f} tok/s"
        self.last_tokens, self.last_time = (int(tokens) if tokens is not None else None), now
        done = state.global_step - self.start_step
        if done > 0 and state.max_steps > state.global_step:
            per_step = (now - self.started) / done
            fields["ETA"] = duration(per_step * (state.max_steps - state.global_step))
        self.echo(self.line(state, fields))

    # -- the line
    def line(self, state, fields: dict[str, str]) -> str:
        width = len(str(state.max_steps))
        step = f"step {state.global_step:>{width}}/{state.max_steps}"
        if self.colour:
            step = click.style(step, bold=True)
        return "  " + "  ".join([step] + [f"{key} {value}".strip() for key, value in fields.items()])


# ---------------------------------------------------------------- the last line of a run


def logged_windows(log_history: list[dict]) -> list[tuple[int, int, float]]:
    """(first step, last step, loss) of each logged training loss: the Trainer logs the mean loss of the steps
    since its previous log."""
    windows, previous = [], 0
    for entry in log_history:
        if "loss" in entry and isinstance(entry.get("step"), int):
            windows.append((previous + 1, entry["step"], entry["loss"]))
            previous = entry["step"]
    return windows


def steps_text(first: int, last: int) -> str:
    return f"step {last}" if first == last else f"steps {first}-{last}"


def final_line(metrics: dict, log_history: list[dict], peak_memory: str | None = None) -> str:
    """'loss 6.0413 (steps 1-10) -> 5.4468 (steps 21-30), eval loss 5.5084, 7 s': what the run did to the loss,
    without claiming a change from a single logged window."""
    windows = logged_windows(log_history)
    parts = []
    if len(windows) == 1:
        first, last, loss = windows[0]
        parts.append(f"loss {number(loss)} ({steps_text(first, last)}, the only logged window; a smaller "
                     "training.logging_steps shows how it changed)")
    elif windows:
        (a, b, start), (c, d, end) = windows[0], windows[-1]
        parts.append(f"loss {number(start)} ({steps_text(a, b)}) -> {number(end)} ({steps_text(c, d)})")
    if metrics.get("eval_loss") is not None:
        parts.append(f"eval loss {number(metrics['eval_loss'])}")
    if metrics.get("train_runtime") is not None:
        parts.append(f"{duration(metrics['train_runtime'])} of training")
    if peak_memory:
        parts.append(f"peak memory {peak_memory}")
    return "lorakit: " + ", ".join(parts) if parts else ""


def measured_peak_memory(device: str) -> str | None:
    """The peak memory this process used: the CUDA allocator's peak on a GPU, the peak resident set on a CPU."""
    from lorakit.training.memory import format_size

    if device == "cuda":
        import torch

        return f"{format_size(torch.cuda.max_memory_allocated())} (GPU, allocated)"
    if device == "cpu":
        try:
            import resource
        except ImportError:  # not on Windows
            return None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        here = processes_on_this_machine()
        whose = f"the main one of {here} processes, each about as much" if here > 1 else "whole process"
        return f"{format_size(peak * (1 if sys.platform == 'darwin' else 1024))} (RAM, {whose})"
    return None


def processes_on_this_machine() -> int:
    """Training processes sharing this machine's RAM (torchrun's LOCAL_WORLD_SIZE; 1 when not launched)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def replace_progress_bar(trainer, progress: Progress) -> None:
    """Take out transformers' own progress printing (a tqdm bar that prints each log as a dict, or with
    disable_tqdm the bare dicts) and put lorakit's lines in."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress)


def memory_estimate_row(recipe, placement, model, record: dict) -> list[tuple[str, str]]:
    """The summary's memory row: lorakit validate's estimate of the peak, for the device this run is on."""
    if placement.device not in ("cpu", "cuda"):
        return []
    from lorakit.training.memory import estimate_recipe_memory, format_size

    config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
    lengths = ((record.get("data") or {}).get("train") or {}).get("length") or {}
    try:
        estimate, setup = estimate_recipe_memory(recipe, config, placement.device, lengths.get("max"))
    except Exception:  # a model the estimator cannot shape from its config: the run goes on without the row
        return []
    here = processes_on_this_machine()
    where = ("of GPU memory per process" if placement.device != "cpu" else
             f"of RAM for each of the {here} processes" if here > 1 else "of RAM for the whole process")
    return [("memory", f"about {format_size(estimate.total)} {where} at the peak (estimate; `lorakit validate` "
                       "shows its parts)"), ("time", f"estimated once the first {1 + TIMING_STEPS} steps are done")]
