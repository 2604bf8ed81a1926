"""loss.png in the run folder: training and eval loss, and the learning rate, against the optimizer step.

Drawn from the Trainer's log history at the end of every run, and when a run is interrupted or fails, so the
picture is there whenever the run record is. matplotlib with its Agg backend: no display needed, no window opened.
"""

from __future__ import annotations

import os
from pathlib import Path

PLOT_FILE = "loss.png"


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(entry.get("step"), int):
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def write_loss_plot(folder: str | os.PathLike, log_history: list[dict], title: str | None = None) -> Path | None:
    """Draw the losses and the learning rate of `log_history` into folder/loss.png; None when nothing was logged.

    The file is written under a temporary name and renamed, so a reader never sees half an image.
    """
    train, evaluation, rate = (series(log_history, key) for key in ("loss", "eval_loss", "learning_rate"))
    if not train[0] and not evaluation[0]:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: works without a display, never opens a window
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train[0]:
            loss_axis.plot(*train, color="tab:blue", marker="." if len(train[0]) < 50 else None, label="train loss")
        if evaluation[0]:
            loss_axis.plot(*evaluation, color="tab:orange", marker="o", label="eval loss")
        loss_axis.set_xlabel("optimizer step")
        loss_axis.set_ylabel("loss (mean over the trained tokens)")
        loss_axis.grid(alpha=0.3)
        handles, labels = loss_axis.get_legend_handles_labels()
        if rate[0]:
            rate_axis = loss_axis.twinx()
            rate_axis.plot(*rate, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
            rate_axis.set_ylabel("learning rate")
            rate_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            more_handles, more_labels = rate_axis.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        loss_axis.legend(handles, labels, loc="upper right")
        if title:
            loss_axis.set_title(title)
        figure.tight_layout()
        target = Path(folder) / PLOT_FILE
        partial = target.with_name(f".{PLOT_FILE}.partial")
        figure.savefig(partial, format="png")
        os.replace(partial, target)
    finally:
        plt.close(figure)
    return target
