"""An Ollama Modelfile whose TEMPLATE renders what the training chat template renders.

Ollama does not run Jinja: its TEMPLATE is a Go template over the system prompt and the messages. lorakit finds
the text the chat template writes around each message by rendering probe conversations (marker contents, with
and without a system prompt, several turns), writes those pieces into one Go template, and then checks that the
pieces reproduce the chat template's rendering of the check conversations exactly. A template that does not
render message by message (one that moves the system prompt into a user turn, or rewrites history) is refused:
no Modelfile is better than one that prompts the model differently from training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError

SYSTEM, USER, REPLY, NEXT = "lorakitSYSTEMmarker", "lorakitUSERmarker", "lorakitREPLYmarker", "lorakitNEXTmarker"
MODELFILE = "Modelfile"


@dataclass
class Pieces:
    """The text a chat template writes around each message, as found by rendering probe conversations."""

    head: str  # before everything (BOS text when the tokenizer does not add BOS itself)
    system_before: str
    system_after: str
    system_mode: str  # "if-given": block only with a system prompt; "always": block always; "none": no system role
    default_system: str | None  # what the template writes when no system prompt is given (Modelfile SYSTEM)
    user_before: str
    user_after: str
    reply_before: str  # the generation prompt: what opens the assistant's turn
    reply_after: str  # what closes it: the end-of-turn token and what follows it
    bos_left_out: str = ""  # BOS text taken off the head: llama.cpp adds BOS itself (add_bos_token)


def render(template_owner, messages: list[dict], generation: bool = True) -> str:
    return template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def find_pieces(tokenizer, bos_added: bool) -> Pieces:
    """The pieces of tokenizer.chat_template, or a one-line refusal naming what it does that Ollama cannot."""
    def fail(why: str) -> LorakitError:
        return LorakitError(f"the chat template cannot be written as an Ollama TEMPLATE: {why}; nothing was "
                            "written. Export --to gguf (its metadata keeps the template for llama.cpp) and write "
                            "the Modelfile's TEMPLATE by hand")

    try:
        one = render(tokenizer, [{"role": "user", "content": USER}])
        bare = render(tokenizer, [{"role": "user", "content": USER}], generation=False)
        turns = render(tokenizer, [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY},
                                   {"role": "user", "content": NEXT}])
        closed = render(tokenizer, [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}],
                        generation=False)
    except Exception as error:  # a template that cannot render a plain exchange
        raise fail(f"it cannot render a plain conversation ({error})") from None
    # Some templates end a conversation that is not awaiting a reply with EOS (Phi-3.5): not part of a turn.
    eos = tokenizer.eos_token or ""
    settled = bare if one.startswith(bare) else bare[:-len(eos)] if eos and bare.endswith(eos) else None
    if settled is None or not one.startswith(settled) or one == settled:
        raise fail("its generation prompt is not text appended after the conversation")
    reply_before = one[len(settled):]
    if not all(marker in turns for marker in (USER, REPLY, NEXT)) or turns.count(USER) != 1:
        raise fail("it does not write each message's content once, as given")
    before_user, rest = turns.split(USER)
    between_user_reply, rest = rest.split(REPLY)
    between_reply_next, after_next = rest.split(NEXT)
    if not between_user_reply.endswith(reply_before) or not after_next.endswith(reply_before):
        raise fail("the assistant's turn does not open with its generation prompt")
    user_after = between_user_reply[:-len(reply_before)]
    if after_next[:-len(reply_before)] != user_after or not settled.endswith(USER + user_after):
        raise fail("the text after a user message depends on its place in the conversation")
    # What closes a reply: as the template closes the last one, else the longest split both places agree on.
    reply_after = closed.rpartition(REPLY)[2]
    if eos and closed.endswith(eos) and not between_reply_next.startswith(reply_after):
        reply_after = reply_after[:-len(eos)]
    if between_reply_next.startswith(reply_after) and before_user.endswith(between_reply_next[len(reply_after):]):
        user_before = between_reply_next[len(reply_after):]
    else:
        user_before = common_suffix(before_user, between_reply_next)
        reply_after = between_reply_next[:len(between_reply_next) - len(user_before)]
    head = before_user[:len(before_user) - len(user_before)]
    if settled != head + user_before + USER + user_after:
        raise fail("the first message renders differently from later ones")
    pieces = Pieces(head, "", "", "none", None, user_before, user_after, reply_before, reply_after)
    find_system(tokenizer, pieces, fail, bos_added)
    if bos_added and tokenizer.bos_token and pieces.head.startswith(tokenizer.bos_token):
        pieces.head = pieces.head[len(tokenizer.bos_token):]
        pieces.bos_left_out = tokenizer.bos_token
    return pieces


def find_system(tokenizer, pieces: Pieces, fail, bos_added: bool) -> None:
    """How the template writes a system prompt; a template that refuses the system role keeps mode "none".

    Without a system prompt, a template writes either no system block (ChatML), the block with a default prompt
    (Qwen2.5, SmolLM2: the Modelfile's SYSTEM then gives Ollama the same default), or the block around an empty
    prompt (Llama 3.1's dated block: written always).
    """
    try:
        with_system = render(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])
    except Exception:
        return
    opening = pieces.user_before + USER + pieces.user_after + pieces.reply_before
    before, found, tail = with_system.partition(SYSTEM)
    if not found or not tail.endswith(opening) or SYSTEM in tail:
        raise fail("it does not write the system prompt as a block of its own before the first user message")
    after = tail[:-len(opening)]
    plain = pieces.head  # the head of a conversation without a system prompt
    if before.startswith(plain):
        pieces.system_before, pieces.system_after, pieces.system_mode = before[len(plain):], after, "if-given"
        return
    if plain.startswith(before) and plain.endswith(after) and len(plain) >= len(before) + len(after):
        default = plain[len(before):len(plain) - len(after)]
        bos = (tokenizer.bos_token or "") if bos_added else ""  # BOS as text starts the head only if it is BOS
        pieces.head = bos if bos and before.startswith(bos) else ""
        pieces.system_before, pieces.system_after = before[len(pieces.head):], after
        pieces.system_mode, pieces.default_system = ("always", None) if not default else ("if-given", default)
        return
    raise fail("the text that starts a conversation changes with the system prompt in a way lorakit cannot write")


def common_suffix(a: str, b: str) -> str:
    size = 0
    while size < min(len(a), len(b)) and a[len(a) - 1 - size] == b[len(b) - 1 - size]:
        size += 1
    return a[len(a) - size:]


def go_template(pieces: Pieces) -> str:
    """The Go template (Ollama's TEMPLATE) made of the pieces; literal text only between actions, no trimming."""
    system = ""
    if pieces.system_mode == "always":
        system = f"{pieces.system_before}{{{{ .System }}}}{pieces.system_after}"
    elif pieces.system_mode == "if-given":
        system = f"{{{{ if .System }}}}{pieces.system_before}{{{{ .System }}}}{pieces.system_after}{{{{ end }}}}"
    return (f"{pieces.head}{system}{{{{ range .Messages }}}}"
            f"{{{{ if eq .Role \"user\" }}}}{pieces.user_before}{{{{ .Content }}}}{pieces.user_after}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{pieces.reply_before}{{{{ .Content }}}}{pieces.reply_after}"
            f"{{{{ end }}}}{{{{ end }}}}{pieces.reply_before}")


def render_pieces(pieces: Pieces, messages: list[dict], system_default: str | None) -> str:
    """What Ollama renders from go_template(pieces), in Python: its system prompt is every system message joined
    by a blank line, or the Modelfile's SYSTEM when the conversation has none."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if not any(m["role"] == "system" for m in messages) and system_default is not None:
        system = system_default
    text = pieces.head
    if pieces.system_mode == "always" or (pieces.system_mode == "if-given" and system):
        text += pieces.system_before + system + pieces.system_after
    for message in messages:
        if message["role"] == "user":
            text += pieces.user_before + message["content"] + pieces.user_after
        elif message["role"] == "assistant":
            text += pieces.reply_before + message["content"] + pieces.reply_after
    return text + pieces.reply_before


def check_pieces(tokenizer, pieces: Pieces, system_default: str | None, conversations: list[list[dict]]) -> dict:
    """Every check conversation (and a multi-turn one) renders byte for byte as the chat template renders it."""
    checked = [*conversations]
    if conversations:
        first = conversations[0]
        checked.append([*first, {"role": "assistant", "content": "A reply.\nOn two lines."},
                        {"role": "user", "content": "And one more question?"}])
    for messages in checked:
        if pieces.system_mode == "none" and any(m["role"] == "system" for m in messages):
            continue
        expected = render(tokenizer, messages if any(m["role"] == "system" for m in messages) or
                          system_default is None else [{"role": "system", "content": system_default}, *messages])
        actual = pieces.bos_left_out + render_pieces(pieces, messages, system_default)
        if actual != expected:
            at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
            raise LorakitError("the Ollama TEMPLATE lorakit derived renders a check conversation differently from "
                               f"the chat template (from character {at}: {actual[at:at + 30]!r} against "
                               f"{expected[at:at + 30]!r}); nothing was written. Export --to gguf and write the "
                               "TEMPLATE by hand")
    return {"conversations_rendered_identically": len(checked)}


def modelfile_text(gguf_name: str, template: str, system: str | None, stops: list[str], origin: str) -> str:
    for what, text in (("TEMPLATE", template), ("SYSTEM", system or ""), *(("stop", s) for s in stops)):
        if '"""' in text or any(not (c.isprintable() or c in "\n\t\r") for c in text):
            raise LorakitError(f"the Modelfile's {what} would hold {text[:40]!r}, which a Modelfile cannot quote "
                               "(three double quotes, or characters Ollama's parser drops); nothing was written")
    lines = [f"# {origin}", f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {quote(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def quote(text: str) -> str:
    return f'"""{text}"""' if '"' in text or "\n" in text else f'"{text}"'


def write_modelfile(folder: Path, gguf_file: Path, source, tokenizer_keys: dict, stops: list[int], out: Path) -> dict:
    """FOLDER/Modelfile beside the GGUF, checked against the chat template; returns its facts for the record."""
    tokenizer = source.tokenizer
    pieces = find_pieces(tokenizer, bool(tokenizer_keys.get("add_bos_token")))
    system = source.trained_system or pieces.default_system
    if pieces.system_mode == "none":
        system = None
    check = check_pieces(tokenizer, pieces, system, source.conversations)
    stop_texts = [tokenizer.decode([i], skip_special_tokens=False) for i in stops]
    origin = f"Exported by lorakit from {Path(source.name).resolve().name}; checks in lorakit_export.json"
    (folder / MODELFILE).write_text(modelfile_text(gguf_file.name, go_template(pieces), system, stop_texts, origin),
                                    encoding="utf-8")
    model_name = re.sub(r"[^a-z0-9._-]+", "-", out.name.lower()).strip("-.") or "lorakit-model"
    notes = []
    if pieces.system_mode == "none":
        notes.append("the chat template has no system role, so the TEMPLATE passes no system prompt")
    return {"modelfile": MODELFILE, "template_check": check, "system": system,
            "system_from": ("the run's data" if source.trained_system else "the chat template's default"
                            if system else None),
            "stop": stop_texts, "bos_added_by_llama_cpp": bool(pieces.bos_left_out), "notes": notes,
            "create_command": f"ollama create {model_name} -f {out.resolve() / MODELFILE}"}
