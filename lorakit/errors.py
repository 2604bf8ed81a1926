"""Which exceptions are the user's input mistakes (clear message, no traceback) and their exit codes."""

from __future__ import annotations

USAGE = 2  # a mistake in the recipe, the data or the command line


class LorakitError(Exception):
    """A problem the user can fix, told in one message; `code` is the exit status."""

    code = USAGE


class OutputDirError(LorakitError):
    """The output folder holds something lorakit must not overwrite."""


def user_error_code(error: BaseException) -> int | None:
    """The exit code for an error the user should see without a traceback, or None for a bug."""
    from lorakit.data import DataError
    from lorakit.recipe import RecipeError

    if isinstance(error, (RecipeError, DataError)):
        return USAGE
    if isinstance(error, LorakitError):
        return error.code
    return None
