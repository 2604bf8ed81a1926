"""The `lorakit` command group. Each command imports its module inside the function, so `--help` never imports torch."""

from __future__ import annotations

import sys

import click

from lorakit import __version__

OVERRIDES_HELP = "OVERRIDES are dotted recipe paths, e.g. training.learning_rate=1e-4 lora.r=8 data.max_length=512."


def fail(message: str, code: int) -> None:
    """Print a user-facing error (no traceback) and exit."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


class UserErrors(click.Group):
    """Turns lorakit's own input errors into one clear message and exit code 2."""

    def invoke(self, ctx: click.Context):
        from lorakit.errors import user_error_code

        try:
            return super().invoke(ctx)
        except Exception as error:  # only lorakit's input errors are caught; the rest keep their traceback
            code = user_error_code(error)
            if code is None:
                raise
            fail(str(error), code)


@click.group(cls=UserErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lorakit")
def main() -> None:
    """Parameter-efficient fine-tuning of LLMs (LoRA, QLoRA) from one YAML recipe.

    Start with: lorakit sft recipes/quickstart.yaml
    """


@main.command(epilog=OVERRIDES_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--output-dir", type=click.Path(file_okay=False), help="Where to write the run (overrides training.output_dir).")
@click.option("--overwrite", is_flag=True, help="Replace a finished or different run already in the output folder.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming an interrupted run (needs --overwrite).")
@click.option("--resume-changed", is_flag=True, help="Resume even though the recipe or data changed since the checkpoint.")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "xpu", "cpu"]), default=None,
              help="Force a device (default: the recipe's model.device, auto).")
def sft(recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool, no_resume: bool,
        resume_changed: bool, device: str | None) -> None:
    """Fine-tune a model with LoRA or QLoRA as RECIPE describes."""
    from lorakit.commands.sft import run_sft

    run_sft(recipe, overrides, output_dir=output_dir, overwrite=overwrite, no_resume=no_resume,
            resume_changed=resume_changed, device=device)


if __name__ == "__main__":
    main()
