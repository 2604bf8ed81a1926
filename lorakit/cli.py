"""The `lorakit` command group.

Each command lives in `lorakit/commands/<module>.py` as a click command named `command`, and is imported only
when it is listed or run. Command modules import torch and friends inside their functions, never at the top,
so `lorakit --help` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

import click

from lorakit import __version__

# command name -> module under lorakit.commands
COMMANDS = {
    "sft": "sft",
    "dpo": "dpo",
    "classify": "classify",
    "sweep": "sweep",
    "validate": "validate",
    "eval": "evaluate",
    "generate": "generate",
    "predict": "predict",
    "merge": "merge",
    "export": "export",
    "push": "push",
    "recipes": "recipes",
    "init": "init",
}


def fail(message: str, code: int) -> None:
    """Print a user-facing error (no traceback) and exit."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


class LorakitGroup(click.Group):
    """Loads commands lazily, and turns lorakit's own input errors into one clear message (no traceback)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        try:
            return importlib.import_module(f"lorakit.commands.{module}").command
        except ModuleNotFoundError as error:
            if error.name == f"lorakit.commands.{module}":
                return None  # not built in this version
            raise

    def invoke(self, ctx: click.Context):
        from lorakit.errors import RunInterrupted, user_error_code
        from lorakit.models.loading import quiet_upstream_logs
        from lorakit.training.launch import is_main_process

        quiet_upstream_logs()  # before any upstream library is imported: some speak up on import
        try:
            return super().invoke(ctx)
        except Exception as error:  # only lorakit's input errors are caught; the rest keep their traceback
            code = user_error_code(error)
            if code is None:
                raise
            if isinstance(error, RunInterrupted) and not is_main_process():
                sys.exit(code)  # every process stopped at the same step; the main one says where, once
            fail(str(error), code)


@click.group(cls=LorakitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lorakit")
def main() -> None:
    """Parameter-efficient fine-tuning of LLMs (LoRA, QLoRA) from one YAML recipe.

    Start with: lorakit sft recipes/quickstart.yaml
    """


if __name__ == "__main__":
    main()
