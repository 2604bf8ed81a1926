"""Talking to the Hub: one commit of the planned files, visibility that does what was asked, clear errors."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from lorakit.errors import HubError
from lorakit.hub.selection import Plan


# ---------------------------------------------------------------- talking to the Hub


def upload(plan: Plan, repo_id: str, private: bool | None, branch: str, message: str, token: str | None,
           token_source: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from lorakit import __version__

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                       f"(create a token with write access at {endpoint}/settings/tokens); nothing was uploaded")
    api = HfApi(endpoint=endpoint, token=token, library_name="lorakit", library_version=__version__)
    where = Where(repo_id, endpoint, token_source, plan.folder, {token})

    with hub_errors(where, "check the token"):
        who = api.whoami()
    where.user = who.get("name")
    access = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if access == "read":
        raise HubError(f"the token from {token_source} is read-only; pushing needs a token with write access "
                       f"({endpoint}/settings/tokens); nothing was uploaded")
    click.echo(f"lorakit: pushing as {where.user} to {endpoint}")

    make_public_after = settle_visibility(api, where, private)
    if branch != "main":
        with hub_errors(where, f"create branch {branch}"):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.readme)]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path, _ in plan.files]
    with hub_errors(where, "upload the files", retry=True):
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=branch)
    if make_public_after:
        with hub_errors(where, "make the repo public (the files are uploaded; the repo stays private)"):
            api.update_repo_settings(repo_id, private=False)

    with hub_errors(where, "list the uploaded files"):
        present = set(api.list_repo_files(repo_id, revision=branch))
    uploaded = {op.path_in_repo for op in operations}
    missing = sorted(uploaded - present)
    if missing:
        raise HubError(f"the Hub does not list {', '.join(missing)} in {repo_id} after the upload; run the same "
                       "command again to retry")
    others = sorted(present - uploaded - {".gitattributes"})
    if others:
        click.echo(f"lorakit: also in the repo, left as they were: {', '.join(others)}")
    url = f"{endpoint}/{repo_id}" + (f"/tree/{branch}" if branch != "main" else "")
    click.echo(f"lorakit: pushed {len(uploaded)} files to {url} (commit {commit.oid[:8]})")
    return commit.commit_url


def settle_visibility(api, where: "Where", private: bool | None) -> bool:
    """Create the repo or bring its visibility to what was asked; True when it must turn public after the upload.

    A private repo turns public only once the upload succeeded, so a failed push never exposes an old state.
    """
    repo_id = where.repo_id
    info = existing_repo(api, where)
    if info is None:
        with hub_errors(where, "create the repo"):
            api.create_repo(repo_id, private=private is not False)
        click.echo(f"lorakit: created {repo_id} ({'public' if private is False else 'private'})")
        return False
    if private is None and not info.private:
        raise HubError(f"{repo_id} exists and is public, while lorakit pushes privately unless told otherwise: pass "
                       "--public to upload to it as a public repo, or --private to make it private first; "
                       "nothing was uploaded")
    if private and not info.private:
        with hub_errors(where, "make the repo private"):
            api.update_repo_settings(repo_id, private=True)
            now_private = api.repo_info(repo_id).private
        if not now_private:
            raise HubError(f"{repo_id} is still public after asking the Hub to make it private; nothing was uploaded")
        click.echo(f"lorakit: {repo_id} was public and is now private, as asked with --private")
    return private is False and bool(info.private)


def existing_repo(api, where: "Where"):
    """The repo's info, or None when it does not exist (or is not visible to this token: creating it then says so)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    with hub_errors(where, "read the repo"):
        try:
            return api.repo_info(where.repo_id)
        except RepositoryNotFoundError:
            return None


@dataclass
class Where:
    """What error messages name: never the token itself, which `secrets` lists for scrubbing."""

    repo_id: str
    endpoint: str
    token_source: str
    folder: Path
    secrets: set[str]
    user: str | None = None


@contextmanager
def hub_errors(where: Where, action: str, retry: bool = False):
    """Turn what the Hub or the network answers into one message saying what to do, never a traceback."""
    from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    untouched = f"nothing in {where.folder} was changed"
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError(f"HF_HUB_OFFLINE is set, so lorakit cannot reach the Hub to {action}; unset it to push "
                       f"({untouched})") from None
    except RepositoryNotFoundError:
        raise HubError(scrub(f"{where.repo_id} was not found, or {where.user or 'this token'} cannot see it "
                             f"(could not {action}); {untouched}", where)) from None
    except RevisionNotFoundError:
        raise HubError(scrub(f"{where.repo_id}: revision not found (could not {action}); {untouched}", where)) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        said = (error.server_message or "").strip().rstrip(".")
        said = f" (the Hub said: {said})" if said else ""
        namespace = where.repo_id.split("/")[0]
        if status == 401:
            text = (f"the Hub at {where.endpoint} rejected the token from {where.token_source} as invalid or expired; "
                    f"create one with write access at {where.endpoint}/settings/tokens, then set HF_TOKEN or run "
                    f"`hf auth login` ({untouched})")
        elif status == 403 and namespace == where.user:
            text = (f"the token from {where.token_source} may not write to {where.repo_id}, so lorakit could not "
                    f"{action}{said}; give the token write access to it at {where.endpoint}/settings/tokens "
                    f"({untouched})")
        elif status == 403:
            text = (f"{where.user or 'this token'} has no write access to {namespace}, so lorakit could not {action}"
                    f"{said}; push to a namespace you can write to (e.g. {where.user or 'your-name'}/"
                    f"{where.repo_id.split('/')[1]}) or use a token with write access to {namespace} ({untouched})")
        elif status is not None and (status >= 500 or status == 429):
            text = (f"the Hub failed to {action} (HTTP {status}{said}); {untouched}: run the same command again "
                    "to retry")
        else:
            text = f"could not {action}: HTTP {status}{said}; {untouched}"
        raise HubError(scrub(text, where)) from None
    except ValueError as error:  # huggingface_hub's own checks, e.g. metadata the Hub refuses
        raise HubError(scrub(f"could not {action}: {error}; {untouched}", where)) from None
    except Exception as error:
        if not is_network_error(error):
            raise
        again = " run the same command again to retry;" if retry else ""
        raise HubError(scrub(f"cannot reach {where.endpoint} to {action} ({type(error).__name__}: {error});{again} "
                             f"check the network or HF_ENDPOINT ({untouched})", where)) from None


def is_network_error(error: BaseException) -> bool:
    # huggingface_hub 1.x raises httpx errors and 2.x httpx2 ones: recognise both by their shared class names.
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "TimeoutException", "Timeout"})


def scrub(text: str, where: Where) -> str:
    """The message on one line (the Hub's own may span several), with any secret replaced."""
    for secret in where.secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return " ".join(text.split())
