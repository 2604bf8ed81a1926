"""`lorakit push`: upload a finished run (LoRA adapter) or a merged model folder to the Hugging Face Hub.

What goes up is decided in lorakit.hub.selection (the allow-list), checked by lorakit.hub.secrets, and sent by
lorakit.hub.upload in a single commit with the model card added from memory, so the folder is never modified:
a failed upload is retried by running the same command again.
"""

from __future__ import annotations

from pathlib import Path

import click

from lorakit.hub import card
from lorakit.hub.secrets import check_no_secrets, known_secrets, resolve_token
from lorakit.hub.selection import Plan, check_repo_id, plan_push
from lorakit.hub.upload import upload


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME", help="Hub model repo to push to.")
@click.option("--private/--public", "private", default=None,
              help="Visibility (default: private). An existing repo is switched to match; without either flag, "
                   "pushing to an existing public repo stops and asks.")
@click.option("--revision", metavar="BRANCH",
              help="Branch to commit to, created from main when missing (default: main).")
@click.option("--commit-message", metavar="TEXT", help="Commit message (default: says what is uploaded).")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card that would go up; contact nothing, "
                                              "change nothing.")
def command(folder: Path, repo_id: str, private: bool | None, revision: str | None, commit_message: str | None,
            dry_run: bool) -> None:
    """Upload a finished run (LoRA adapter) or a merged model FOLDER to the Hugging Face Hub, with a model card.

    The token comes from HF_TOKEN, else the login saved by `hf auth login` (never from the command line, which
    shell history keeps); HF_ENDPOINT is honoured.
    """
    push(folder, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run)


def push(folder: Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False) -> str | None:
    """Push FOLDER to REPO_ID; return the commit URL (None for a dry run)."""
    check_repo_id(repo_id)
    plan = plan_push(Path(folder), repo_id)
    token, token_source = resolve_token()
    message = commit_message or f"Upload {'LoRA adapter' if plan.kind == card.ADAPTER else 'merged model'} with lorakit"
    check_no_secrets(plan, message, known_secrets(token, token_source, plan.folder))
    print_plan(plan, repo_id, private, revision)
    if dry_run:
        click.echo(f"--- README.md ({plan.card_origin}) ---")
        click.echo(plan.readme.decode("utf-8", errors="replace").rstrip("\n"))
        click.echo("--- end of README.md ---")
        click.echo("lorakit: dry run; nothing was uploaded and nothing was changed.")
        return None
    return upload(plan, repo_id, private, revision or "main", message, token, token_source)


# ---------------------------------------------------------------- printing


def print_plan(plan: Plan, repo_id: str, private: bool | None, revision: str | None) -> None:
    visibility = {True: "private", False: "public",
                  None: "private (an existing public repo stops the push: pass --public or --private)"}[private]
    kind = "LoRA adapter" if plan.kind == card.ADAPTER else "merged model"
    total = sum(path.stat().st_size for _, path, _ in plan.files) + len(plan.readme)
    rows = [("folder", f"{plan.folder} ({kind})"), ("repo", f"{repo_id}, branch {revision or 'main'}, {visibility}"),
            ("upload", f"{len(plan.files) + 1} files, {size_text(total)}")]
    uploads = [("README.md", len(plan.readme), f"model card, {plan.card_origin}")]
    uploads += [(name, path.stat().st_size, what) for name, path, what in plan.files]
    width = max(len(name) for name, _, _ in uploads)
    rows += [("", f"{name:<{width}}  {size_text(size):>9}  {what}") for name, size, what in uploads]
    if plan.left_out:
        width = max(len(name) for name, _ in plan.left_out)
        rows += [("left out" if i == 0 else "", f"{name:<{width}}  {why}")
                 for i, (name, why) in enumerate(plan.left_out)]
    click.secho("lorakit push", bold=True)
    for key, value in rows:
        click.echo(f"  {key:<8}  {value}")


def size_text(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""
