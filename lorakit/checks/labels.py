"""The trained tokens of real rows: every reply ends with a trained end-of-turn token, no prompt token is trained,
and the chat template saved with the adapter is the one training used."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import click

from lorakit.checks.findings import Findings
from lorakit.checks.inputs import quiet_progress_bars
from lorakit.recipe.sections import Recipe

CHECKED_ROWS = 200  # rows of each training source whose trained tokens are checked one by one

# ---------------------------------------------------------------- the trained tokens of real rows


@dataclass
class TokenIssue:
    """One kind of masking mistake, counted over the checked rows, with the first row that shows it."""

    rows: int = 0
    first: str = ""
    detail: str = ""
    shown: str = ""  # the first row as trained, its trained tokens marked

    def add(self, where: str, detail: str = "", shown: str = "") -> None:
        if not self.rows:
            self.first, self.detail, self.shown = where, detail, shown
        self.rows += 1


@dataclass
class RowCheck:
    """What is wrong with the trained tokens of one row (all None/False: nothing)."""

    end_of_turn: str | None = None  # "absent": not after the reply at all; "present": there but not trained
    mapped: bool = False  # its tokens could be placed in its messages' text, so the prompt checks ran
    trained_prompt: str | None = None  # the text of prompt tokens that are trained
    untrained_reply: bool = False
    left_out: str | None = None  # a system or user message the template does not render ("message 1 (system)")


def check_row(tokenization, example: dict, ids: list[int], labels: list[int]) -> RowCheck:
    """Check one encoded row (`ids` and `labels` as training sees them) against its rendered text, found anew here
    rather than taken from how the labels were made:

    - each trained reply is followed, before the next message, by an end-of-turn token, and that token is trained;
    - no token lying inside a system, user or tool message's text, nor any token of the prompt the template writes
      before the first reply (the conversation up to it with the generation prompt), is trained;
    - every token of each trained reply's text is trained.
    Text a template puts between the generation prompt and the reply (Qwen3's empty think block) is neither.
    """
    from lorakit.data.labels import IGNORE

    check = RowCheck()
    stops = tokenization.stop_ids
    spans = message_spans(tokenization, example, ids) if "messages" in example else None
    if spans is None:  # text, prompt/completion, or a conversation that could not be mapped: count trained stops
        turns = sum(m["role"] == "assistant" and m.get("train", True) for m in example["messages"]) \
            if "messages" in example else 1
        if sum(1 for i, label in zip(ids, labels) if label != IGNORE and i in stops) < turns:
            check.end_of_turn = "present" if any(i in stops for i in ids) else "absent"
        return check
    text, offsets, replies, others, prompt_end = spans
    check.left_out = next((f"message {number} ({m['role']})" for number, m in enumerate(example["messages"], 1)
                           if m["role"] in ("system", "user") and m["content"].strip()
                           and m["content"].strip() not in text), None)
    for number, (first, end, _) in enumerate(replies):
        bound = min([a for a, _ in others if a >= end] + [replies[number + 1][0] if number + 1 < len(replies)
                                                          else len(text)])
        after = next((p for p, (a, b) in enumerate(offsets) if a >= end and b <= bound and ids[p] in stops), None)
        if after is None:
            check.end_of_turn = "absent"
        elif labels[after] == IGNORE and check.end_of_turn is None:
            check.end_of_turn = "present"
    if tokenization.train_on != "completions":
        return check
    check.mapped = True
    inside = lambda a, b: [p for p, (s, e) in enumerate(offsets) if a <= s and e <= b and e > s]
    prompt = {p for a, b in [*others, (0, prompt_end)] for p in inside(a, b)}
    wrong = sorted(p for p in prompt if labels[p] != IGNORE)
    if wrong:
        check.trained_prompt = tokenization.tokenizer.decode([ids[p] for p in wrong[:24]], skip_special_tokens=False)
    check.untrained_reply = any(labels[p] == IGNORE for a, b, _ in replies for p in inside(a, b))
    return check


def message_spans(tokenization, example: dict, ids: list[int]):
    """(text, offsets, replies, others, prompt end) of a conversation's rendering, or None when its tokens cannot
    be placed in the text (no offsets, other token ids than training's).

    replies: (start, end, message) of each trained reply's text, found in order; others: (start, end) of every
    occurrence of a system, user or tool message's text outside the replies; prompt end: how much of the text is
    the prompt the template writes before the first reply.
    """
    from lorakit.data.labels import payload_plans

    tokenizer = tokenization.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        return None
    messages = [{k: v for k, v in m.items() if k != "train"} for m in example["messages"]]
    tools = example.get("tools") or None
    text = tokenization.render(messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(ids):
        return None
    replies, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":  # a reply comes after the messages before it (a tool list may name
            content = (message.get("content") or "").strip()  # its calls earlier)
            found = text.find(content, cursor) if content else -1
            cursor = found + len(content) if found >= 0 else cursor
            continue
        for plan in payload_plans(message):
            pieces = [next(((text.find(f, cursor), f) for f in forms if f and f in text[cursor:]), None)
                      for kind, forms in plan if kind != "reasoning"]
            if pieces and None not in pieces:
                start, end = pieces[0][0], pieces[-1][0] + len(pieces[-1][1])
                cursor = end
                if example["messages"][index].get("train", True):
                    replies.append((start, end, index))
                break
    others = []
    for message in messages:
        content = (message.get("content") or "").strip() if message["role"] != "assistant" else ""
        start = text.find(content) if content else -1
        while start >= 0:
            if not any(a <= start < b for a, b, _ in replies):
                others.append((start, start + len(content)))
            start = text.find(content, start + 1)
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), 0)
    prompt_end = 0
    if first:
        try:
            prompt = tokenization.render(messages[:first], tools, add_generation_prompt=True)
        except Exception:  # a template that refuses that conversation: nothing to compare with
            prompt = ""
        while prompt_end < min(len(prompt), len(text)) and prompt[prompt_end] == text[prompt_end]:
            prompt_end += 1
    return text, list(encoded["offset_mapping"]), replies, sorted(others), prompt_end


def check_trained_tokens(recipe: Recipe, tokenizer, findings: Findings) -> None:
    """Encode the first rows of each training source as sft does and check which tokens carry a label.

    - every assistant reply ends with a trained end-of-turn token (otherwise the model never learns to stop);
    - with train_on: completions, no token of a system, user or tool message, nor of the prompt before the first
      reply, is trained; and every token of every assistant reply is.
    """
    from lorakit.data.labels import Tokenization
    from lorakit.data.render import render_example
    from lorakit.models.loading import end_of_turn_token

    click.secho("trained tokens", bold=True)
    train_on = recipe.data["train_on"]
    tokenization = Tokenization.for_tokenizer(tokenizer, train_on)
    end = end_of_turn_token(tokenizer) or tokenizer.eos_token
    no_stop, prompt_trained, reply_untrained, left_out = TokenIssue(), TokenIssue(), TokenIssue(), TokenIssue()
    checked = mapped = 0
    with quiet_progress_bars():
        for source in recipe.data["train"]:
            for row, example in first_examples(source, CHECKED_ROWS):
                ids, labels = tokenization.encode(example)
                if len(ids) > recipe.data["max_length"]:
                    continue  # cut by truncation: its end is not trained by design, and is counted as truncated
                where = f"{source['path']} row {row}"
                check = check_row(tokenization, example, ids, labels)
                checked += 1
                mapped += check.mapped
                shown = render_example(tokenizer, ids, labels, color=False) if check.end_of_turn or \
                    check.trained_prompt or check.untrained_reply else ""
                if check.end_of_turn:
                    no_stop.add(where, check.end_of_turn, shown)
                if check.trained_prompt:
                    prompt_trained.add(where, check.trained_prompt, shown)
                if check.untrained_reply:
                    reply_untrained.add(where, shown=shown)
                if check.left_out:
                    left_out.add(where, check.left_out)
    if not checked:
        findings.warning("no row could be checked: every checked row is longer than data.max_length")
        return
    scope = f"{checked} rows checked, at most the first {CHECKED_ROWS} of each training source"
    if left_out.rows:
        findings.warning(f"the chat template leaves out a system or user message in {left_out.rows} of {checked} "
                         f"rows (first: {left_out.first}, {left_out.detail}): the model is trained without it, "
                         "though a prompt at inference has it (Mistral's templates put the system prompt only into "
                         "a user turn that ends the conversation)")
    if no_stop.rows:
        why = ("it follows the reply but is masked" if no_stop.detail == "present"
               else "the chat template does not put it after the reply at all")
        findings.problem(f"the end-of-turn token {end!r} is not trained at the end of every assistant reply in "
                         f"{no_stop.rows} of {checked} rows (first: {no_stop.first}): {why}. The model would never "
                         "learn to stop. Use a chat template that closes every assistant turn with the end-of-turn "
                         "or EOS token (model.chat_template: chatml ships with lorakit)" + _shown(no_stop))
    else:
        findings.ok(f"{end!r} is trained at the end of every assistant reply ({scope})")
    if recipe.data["train_on"] != "completions":
        return
    if not mapped:
        findings.warning("cannot map tokens back to message text with this tokenizer (no offsets, or the chat "
                         "template rewrites the text); which tokens of user and system messages are trained was "
                         "not checked")
        return
    if prompt_trained.rows:
        findings.problem(f"tokens before the assistant reply are trained in {prompt_trained.rows} of {mapped} rows, "
                         f"though data.train_on is completions (first: {prompt_trained.first}: "
                         f"{prompt_trained.detail!r})" + _shown(prompt_trained))
    else:
        findings.ok(f"no token of a system or user message is trained, nor of a tool result or the prompt before "
                    f"the first reply ({mapped} rows mapped to their text)")
    if reply_untrained.rows:
        findings.problem(f"the assistant reply is not entirely trained in {reply_untrained.rows} of {mapped} rows "
                         f"(first: {reply_untrained.first})" + _shown(reply_untrained))


def _shown(issue: TokenIssue) -> str:
    from lorakit.data.render import legend

    rendered = issue.shown.rstrip().replace("\n", "\n  ")
    return f". That row as trained ({legend(False)}):\n  {rendered}"


def first_examples(source: dict, limit: int) -> list[tuple[int, dict]]:
    """(row number, example) for the first `limit` rows of a source, mapped to messages/prompt/text as sft maps them."""
    from lorakit.data.sources import detect_format, load_source
    from lorakit.data.formats import row_to_example

    dataset = load_source(source)
    renames = {src: dst for dst, src in (source.get("columns") or {}).items()}
    if renames:
        dataset = dataset.rename_columns(renames)
    fmt = source.get("format") or detect_format(dataset.column_names, source["path"])
    examples = []
    for index in range(min(limit, len(dataset))):
        try:
            examples.append((index + 1, row_to_example(dataset[index], fmt)))
        except ValueError:
            continue  # an unusable row stops prepare_data first; it is never trained
    return examples


# ---------------------------------------------------------------- the chat template inference will use


def check_saved_template(tokenizer, recipe: Recipe, findings: Findings) -> None:
    """Save the tokenizer as sft saves it with the adapter, load it back, and compare the chat template."""
    from transformers import AutoTokenizer

    click.secho("chat template", bold=True)
    conversation = [{"role": "user", "content": "Is the template saved?"}]
    with tempfile.TemporaryDirectory(prefix="lorakit-validate-") as folder:
        tokenizer.save_pretrained(folder)
        saved = AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.model.get("trust_remote_code", False))
    used_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    saved_ids = saved.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True) \
        if saved.chat_template else None
    if saved.chat_template != tokenizer.chat_template or _ids(saved_ids) != _ids(used_ids):
        findings.problem("the chat template saved with the tokenizer (what inference will load from the output "
                         "folder) differs from the one used for training; prompts at inference would not match "
                         "training. Set model.chat_template explicitly (a name, a .jinja file or a Jinja string)")
    else:
        findings.ok("the chat template saved with the adapter is the one training uses, so inference prompts "
                    "match training")


def _ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    return list(value["input_ids"] if hasattr(value, "keys") else value)
