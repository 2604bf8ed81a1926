"""The secret scan of a push: no access token, known or pattern-matched, goes up in any file or message."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import yaml

from lorakit.errors import LorakitError
from lorakit.hub import card
from lorakit.hub.selection import SAFETENSORS_HEADER_LIMIT, Plan
from lorakit.training import run_dir
from lorakit.recipe.sections import SECRET_KEY_PATTERN

# A Hugging Face access token, wherever it hides; checked besides the token values known to this process. No word
# boundary: in a file, a token can follow any character (JSON writes "login:\nhf_..." with a letter before it).
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
# Recipe keys that hold a tokenizer's special token, not a credential, although they end in "token".
SPECIAL_TOKEN_KEY = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask|additional_special)_tokens?$")


# ---------------------------------------------------------------- secrets


def resolve_token() -> tuple[str | None, str]:
    """The token to push with and where it came from (for messages; the value itself is never printed)."""
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(variable, "").strip():
            return os.environ[variable].strip(), variable
    from huggingface_hub import get_token

    token = get_token()
    return (token, "the saved login (hf auth login)") if token else (None, "")


def known_secrets(token: str | None, token_source: str, folder: Path) -> dict[str, str]:
    """{secret value: where it comes from} for every credential this push knows of."""
    secrets = {}
    if token:
        secrets[token] = f"the token from {token_source}"
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(variable, "").strip()
        if value:
            secrets.setdefault(value, f"the token from {variable}")
    saved = saved_login_token()
    if saved:
        secrets.setdefault(saved, "the token of the saved login (hf auth login)")
    try:
        recipe = card.read_recipe(folder / run_dir.RECIPE_FILE) or {}
    except LorakitError:
        recipe = {}
    for key, value in credential_values(recipe):
        secrets.setdefault(value, f"the value of {key} in {run_dir.RECIPE_FILE}")
    return {value: source for value, source in secrets.items() if len(value) >= 8}


def saved_login_token() -> str | None:
    from huggingface_hub import constants

    try:
        return Path(constants.HF_TOKEN_PATH).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def credential_values(value, path: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) for each non-empty credential in a recipe that was not redacted."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            dotted = f"{path}{key}"
            if (isinstance(item, str) and item and item != "<redacted>" and SECRET_KEY_PATTERN.search(str(key))
                    and not SPECIAL_TOKEN_KEY.match(str(key))):
                found.append((dotted, item))
            else:
                found += credential_values(item, dotted + ".")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += credential_values(item, f"{path}{index}.")
    return found


def check_no_secrets(plan: Plan, message: str, secrets: dict[str, str]) -> None:
    """Refuse the push if any text that would go up holds a known secret or anything shaped like a Hub token.

    Every uploaded file is scanned as it is written and, where it is JSON or YAML, as its decoded strings too:
    an escape (`\n`, `\u0068f_...`) hides a token from the raw bytes but not from whoever reads the file.
    The refusal names the file and where the secret comes from, never the secret itself.
    """
    texts = [(f"{name} in {plan.folder}", path.name, scannable_bytes(path)) for name, path, _ in plan.files]
    texts += [(f"the model card (README.md, {plan.card_origin})", "README.md", plan.readme),
              ("--commit-message", "", message.encode())]
    for where, name, data in texts:
        for text in readings(name, data):
            for value, source in secrets.items():
                if value in text:
                    raise LorakitError(f"{where} contains {source}; nothing was uploaded. Remove it (lorakit "
                                       "writes <redacted> in its place) and push again.")
            if TOKEN_PATTERN.search(text):
                raise LorakitError(f"{where} contains something shaped like a Hugging Face token (hf_...); nothing "
                                   "was uploaded. Remove it and push again.")


def readings(name: str, data: bytes) -> list[str]:
    """The ways a file's text can be read: as written, and each string of it once JSON or YAML escapes are decoded."""
    text = data.decode("utf-8", errors="replace")
    found = [text]
    decoded = None
    if name.endswith((".json", ".safetensors")):
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = None
    elif name.endswith((".yaml", ".yml")):
        try:
            decoded = yaml.safe_load(text)
        except yaml.YAMLError:
            decoded = None
    if decoded is not None:
        found.append("\0".join(strings_in(decoded)))  # one text to search; neither a token nor a secret holds NUL
    return found


def strings_in(value):
    """Every string in decoded JSON or YAML, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)


def scannable_bytes(path: Path) -> bytes:
    """A text file's bytes; for safetensors weights, the JSON header, and for GGUF files, their metadata: the only
    places text can hide in them (the weights, gigabytes, are never read)."""
    if path.suffix == ".gguf":
        return gguf_strings(path)
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if size > SAFETENSORS_HEADER_LIMIT:
            raise LorakitError(f"{path} is not a valid safetensors file (header of {size} bytes)")
        return handle.read(size)


# GGUF metadata value types (gguf-py's GGUFValueType): fixed sizes in bytes; 8 is a string, 9 an array.
GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_strings(path: Path) -> bytes:
    """Every string of a GGUF file's header (metadata keys and values, tensor names), NUL-separated."""
    with path.open("rb") as handle:
        def read(size: int) -> bytes:
            data = handle.read(size)
            if len(data) != size:
                raise LorakitError(f"{path} is not a valid GGUF file (it ends inside its header)")
            return data

        def number(fmt: str) -> int:
            return struct.unpack("<" + fmt, read(struct.calcsize(fmt)))[0]

        def string() -> bytes:
            length = number("Q")
            if length > SAFETENSORS_HEADER_LIMIT:
                raise LorakitError(f"{path} is not a valid GGUF file (a header string of {length} bytes)")
            return read(length)

        def value(kind: int, found: list[bytes]) -> None:
            if kind == GGUF_STRING:
                found.append(string())
            elif kind == GGUF_ARRAY:
                item_kind, count = number("I"), number("Q")
                if item_kind in GGUF_SIZES:
                    handle.seek(GGUF_SIZES[item_kind] * count, 1)  # numbers: skipped, not read
                else:
                    for _ in range(count):
                        value(item_kind, found)
            elif kind in GGUF_SIZES:
                handle.seek(GGUF_SIZES[kind], 1)
            else:
                raise LorakitError(f"{path} is not a valid GGUF file (metadata of unknown type {kind})")

        if read(4) != b"GGUF":
            raise LorakitError(f"{path} is not a GGUF file (it does not start with GGUF)")
        number("I")  # version
        tensors, entries = number("Q"), number("Q")
        found: list[bytes] = []
        for _ in range(entries):
            found.append(string())
            value(number("I"), found)
        for _ in range(tensors):
            found.append(string())
            handle.seek(8 * number("I") + 4 + 8, 1)  # its dimensions, type and offset
    return b"\0".join(found)
