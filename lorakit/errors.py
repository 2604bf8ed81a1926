"""Every error lorakit tells the user about, each with its exit code. Imports nothing of lorakit.

A `LorakitError` is a problem the user can fix, told in one message without a traceback; anything else is a
bug and keeps its traceback. Exit codes are documented in docs/reliability.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

USAGE = 2  # a mistake in the recipe, the data or the command line
EXIT_DIVERGED = 3
EXIT_OUT_OF_MEMORY = 4
EXIT_DISK_FULL = 5
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL, "try again later": schedulers can requeue on it, and the rerun resumes


class LorakitError(Exception):
    """A problem the user can fix, told in one message; `code` is the exit status."""

    code = USAGE


@dataclass
class Problem:
    """One problem in a recipe, at its YAML path and line."""

    path: str
    message: str
    line: int | None = None
    source: str | None = None  # "command line" for overrides

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else (f" (line {self.line})" if self.line else "")
        return f"{self.path}{where}: {self.message}"


class RecipeError(LorakitError):
    """Every problem in a recipe, one per line."""

    def __init__(self, file: str | os.PathLike | None, problems: list[Problem]):
        self.file = str(file) if file else None
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.file}: " if self.file else ""
        count = len(self.problems)
        lines = [f"{head}{count} problem{'s' if count != 1 else ''} in the recipe:"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class DataError(LorakitError):
    """Data that cannot be used, named by file and row."""


class OutputDirError(LorakitError):
    """The output folder holds something lorakit must not overwrite."""


class RunInterrupted(LorakitError):
    """A stop signal ended the run after a resumable checkpoint was saved."""

    code = EXIT_INTERRUPTED


class TrainingDiverged(LorakitError):
    """The loss, a gradient or a weight became NaN or infinite."""

    code = EXIT_DIVERGED


class TrainingStalled(TrainingDiverged):
    """Training stopped learning: a gradient norm of exactly 0, or a loss that no longer moves, step after step."""


class DiskFull(LorakitError):
    """The disk filled up while the run wrote to it; the last complete checkpoint is kept."""

    code = EXIT_DISK_FULL


class OutOfMemory(LorakitError):
    """The device ran out of memory; the message says what to change."""

    code = EXIT_OUT_OF_MEMORY


class ValidationFailed(LorakitError):
    """The recipe is valid, but the run it describes cannot start as it stands."""

    code = 1


class MergeCheckError(LorakitError):
    """The merged model does not compute what base + adapter computes."""

    code = 1


class ExportCheckError(LorakitError):
    """An exported model (GGUF, Ollama, vLLM) does not answer like the model it was exported from."""

    code = 1


class HubError(LorakitError):
    """The Hub could not be reached or refused a request; the local folder is never changed."""

    code = 1


def user_error_code(error: BaseException) -> int | None:
    """The exit code for an error the user should see without a traceback, or None for a bug."""
    if isinstance(error, LorakitError):
        return error.code
    return None
