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

    def add(self, where: str, detail: str = "") -> None:
        if not self.rows:
            self.first, self.detail = where, detail
        self.rows += 1


@dataclass
class RowCheck:
    """What is wrong with the trained tokens of one row (all None/False: nothing)."""

    end_of_turn: str | None = None  # "absent": not after the reply at all; "present": there but not trained
    mapped: bool = False  # its tokens could be placed in its messages' text, so the prompt checks ran
    trained_prompt: str | None = None  # the text of prompt tokens that are trained
    untrained_reply: bool = False


def check_row(tokenizer, example: dict, ids: list[int], labels: list[int], stops: tuple[int, ...],
              train_on: str) -> RowCheck:
    """Check one encoded row: `ids` and `labels` as training sees them, `stops` the end-of-turn token ids."""
    from lorakit.data.labels import IGNORE

    check = RowCheck()
    spans = message_spans(tokenizer, example["messages"], ids) if "messages" in example else None
    replies = [(first, end) for role, first, end in spans or () if role == "assistant"]
    if replies:
        # Each reply's end is the first end-of-turn token between it and the next reply; it must be trained.
        bounds = [first for first, _ in replies[1:]] + [len(ids)]
        ends = [next((q for q in range(end, bound) if ids[q] in stops), None)
                for (_, end), bound in zip(replies, bounds)]
        if None in ends:
            check.end_of_turn = "absent"
        elif any(labels[q] == IGNORE for q in ends):
            check.end_of_turn = "present"
    else:  # text, prompt/completion, or a conversation that could not be mapped: count trained stops per reply
        turns = sum(m["role"] == "assistant" for m in example["messages"]) if "messages" in example else 1
        if sum(1 for i, label in zip(ids, labels) if label != IGNORE and i in stops) < turns:
            check.end_of_turn = "present" if any(i in stops for i in ids) else "absent"
    if spans is None or train_on != "completions":
        return check
    check.mapped = True
    prompt = set(range(replies[0][0]) if replies else ())
    prompt = prompt.union(*(range(first, end) for role, first, end in spans if role != "assistant"))
    wrong = sorted(p for p in prompt if labels[p] != IGNORE)
    if wrong:
        check.trained_prompt = tokenizer.decode([ids[p] for p in wrong[:24]], skip_special_tokens=False)
    check.untrained_reply = any(labels[p] == IGNORE for first, end in replies for p in range(first, end))
    return check


def check_trained_tokens(recipe: Recipe, tokenizer, findings: Findings) -> None:
    """Encode the first rows of each training source as sft does and check which tokens carry a label.

    - every assistant reply ends with a trained end-of-turn token (otherwise the model never learns to stop);
    - with train_on: completions, no token of a system or user message, nor any text before the first reply,
      is trained; and every token of every assistant reply is.
    """
    from lorakit.data.labels import Tokenization
    from lorakit.models.loading import end_of_turn_token

    click.secho("trained tokens", bold=True)
    train_on = recipe.data["train_on"]
    tokenization = Tokenization.for_tokenizer(tokenizer, train_on)
    end = end_of_turn_token(tokenizer) or tokenizer.eos_token
    no_stop, prompt_trained, reply_untrained = TokenIssue(), TokenIssue(), TokenIssue()
    checked = mapped = 0
    with quiet_progress_bars():
        for source in recipe.data["train"]:
            for row, example in first_examples(source, CHECKED_ROWS):
                ids, labels = tokenization.encode(example)
                if len(ids) > recipe.data["max_length"]:
                    continue  # cut by truncation: its end is not trained by design, and is counted as truncated
                where = f"{source['path']} row {row}"
                check = check_row(tokenizer, example, ids, labels, tokenization.stop_ids, train_on)
                checked += 1
                mapped += check.mapped
                if check.end_of_turn:
                    no_stop.add(where, check.end_of_turn)
                if check.trained_prompt:
                    prompt_trained.add(where, check.trained_prompt)
                if check.untrained_reply:
                    reply_untrained.add(where)
    if not checked:
        findings.warning("no row could be checked: every checked row is longer than data.max_length")
        return
    scope = f"{checked} rows checked, at most the first {CHECKED_ROWS} of each training source"
    if no_stop.rows:
        why = ("it follows the reply but is masked" if no_stop.detail == "present"
               else "the chat template does not put it after the reply at all")
        findings.problem(f"the end-of-turn token {end!r} is not trained at the end of every assistant reply in "
                         f"{no_stop.rows} of {checked} rows (first: {no_stop.first}): {why}. The model would never "
                         "learn to stop. Use a chat template that closes every assistant turn with the end-of-turn "
                         "or EOS token (model.chat_template: chatml ships with lorakit)")
    else:
        findings.ok(f"{end!r} is trained at the end of every assistant reply ({scope})")
    if recipe.data["train_on"] != "completions":
        return
    if not mapped:
        findings.warning("cannot map tokens back to message text with this tokenizer (no offsets, or the chat "
                         "template rewrites the text); which tokens of user and system messages are trained was "
                         "not checked")
        return
    template_hint = ("The chat template renders a conversation differently once a reply follows (compare its "
                     "output with and without add_generation_prompt), so lorakit cannot tell where the reply "
                     "starts; use a template that renders the turns before a reply the same way in both")
    if prompt_trained.rows:
        findings.problem(f"tokens before the assistant reply are trained in {prompt_trained.rows} of {mapped} rows, "
                         f"though data.train_on is completions (first: {prompt_trained.first}: "
                         f"{prompt_trained.detail!r}). {template_hint}")
    else:
        findings.ok(f"no token of a system or user message is trained ({mapped} rows mapped to their text)")
    if reply_untrained.rows:
        findings.problem(f"the assistant reply is not entirely trained in {reply_untrained.rows} of {mapped} rows "
                         f"(first: {reply_untrained.first}). {template_hint}")


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


def message_spans(tokenizer, messages: list[dict], ids: list[int]) -> list[tuple[str, int, int]] | None:
    """(role, first, end) token positions lying wholly inside each message's text; None when not mappable.

    The chat template's text is tokenized with character offsets. apply_chat_template tokenizes that same text,
    which is checked (same token ids) before any position is trusted. A message whose text the template
    rewrites cannot be placed and is left out.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(ids):
        return None
    offsets = encoded["offset_mapping"]
    spans, cursor = [], 0
    for message in messages:
        content = message["content"]
        start = text.find(content, cursor) if content.strip() else -1
        if start < 0:
            continue
        end = start + len(content)
        cursor = end
        inside = [p for p, (a, b) in enumerate(offsets) if start <= a and b <= end and b > a]
        if inside:
            spans.append((message["role"], inside[0], inside[-1] + 1))
    return spans


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
