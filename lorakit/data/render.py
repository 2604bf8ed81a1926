"""Showing a tokenized example with the tokens that will be trained marked.

In a terminal the trained tokens are coloured; anywhere else (a file, a pipe, a CI log) they are put between
[[ and ]], so the marking survives without colour.
"""

from __future__ import annotations

import click

from lorakit.data.labels import IGNORE

OPEN, CLOSE = "[[", "]]"


def trained_runs(input_ids: list[int], labels: list[int]) -> list[tuple[list[int], bool]]:
    """The example cut into runs of consecutive tokens that are all trained, or all not."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


def render_example(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The example's text, special tokens included, with its trained tokens marked."""
    parts = []
    for ids, trained in trained_runs(input_ids, labels):
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not color:
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
        elif trained:
            # Colour alone would hide a trained space; an underline shows where it is.
            parts.append(_style_lines(text, fg="green", bold=True, underline=True))
        else:
            parts.append(_style_lines(text, dim=True))
    return "".join(parts)


def _style_lines(text: str, **style) -> str:
    """Style each line on its own, so line breaks (and the caller's indentation after them) stay unstyled."""
    return "\n".join(click.style(line, **style) if line else "" for line in text.split("\n"))


def legend(color: bool) -> str:
    if color:
        return "trained tokens in " + click.style("green", fg="green", bold=True, underline=True)
    return f"trained tokens between {OPEN} and {CLOSE}"
