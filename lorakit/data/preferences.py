"""Preference pairs for DPO: each row's prompt, chosen and rejected response, tokenized as `lorakit sft` tokenizes
a conversation, so the tokens scored are exactly those sft would train: the reply and its end-of-turn token.

Row shapes (after a source's `columns:` renames):
  * `prompt`, `chosen`, `rejected` strings: plain text without a chat template, as sft's prompt_completion rows;
    EOS ends each response.
  * `chosen` and `rejected` lists of messages (UltraFeedback, HH-RLHF): the prompt is the messages both share
    (every turn before the last reply); when they share none, `prompt` gives it (a string: one user message, or a
    list of messages). Each response is one assistant message, rendered through the chat template.

Every row becomes `prompt_ids`, `chosen_ids`, `rejected_ids`: what trl's DPO collator takes. A row that cannot be
a pair (a field missing, an empty response, chosen equal to rejected) is named by file and row, or left out and
counted when `preference.on_bad_rows: drop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.formats import _messages, _show
from lorakit.data.labels import Tokenization, last_trained_span
from lorakit.data.pipeline import MAX_REPORTED_ROW_ERRORS, SourceReport, _sample
from lorakit.data.sources import load_renamed, source_fingerprint
from lorakit.errors import DataError

PAIR_COLUMNS = ("chosen", "rejected")


@dataclass
class PairReport:
    rows: int = 0
    tokens: int = 0  # prompt + chosen + rejected
    trained_tokens: int = 0  # scored: the chosen and rejected responses
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0  # the prompt alone fills max_length
    dropped_bad_rows: dict[str, int] = field(default_factory=dict)  # reason -> rows (on_bad_rows: drop)
    lengths: list[int] = field(default_factory=list, repr=False)  # the longer sequence of each pair
    sources: list[SourceReport] = field(default_factory=list)

    def length_stats(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]
        return {"min": ordered[0], "median": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.rows, "rows": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "dropped_no_trained_tokens": self.dropped_no_trained_tokens,
                "dropped_bad_rows": dict(self.dropped_bad_rows), "length": self.length_stats(),
                "sources": [source.__dict__ for source in self.sources]}


@dataclass
class PreparedPairs:
    train: Any  # datasets.Dataset of prompt_ids, chosen_ids, rejected_ids
    eval: Any | None
    reports: dict[str, PairReport]


# ---------------------------------------------------------------- one row


class BadRow(ValueError):
    """A row that cannot be a preference pair; `reason` is its kind, counted when such rows are dropped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def split_row(row: dict) -> tuple[str, Any, Any, Any]:
    """(shape, prompt, chosen reply, rejected reply): "text" with three strings, or "chat" with the prompt's
    messages and the two assistant messages. Raises BadRow saying what is wrong."""
    for name in PAIR_COLUMNS:
        if row.get(name) is None:
            raise BadRow("missing field", f"has no {name!r}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise BadRow("missing field", "has 'chosen' and 'rejected' strings but no 'prompt' string "
                         f"(got {_show(prompt)}); a text pair needs all three")
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise BadRow("empty response", f"{name!r} is empty")
        if chosen == rejected:
            raise BadRow("chosen equals rejected", "'chosen' and 'rejected' are the same response")
        return "text", prompt, chosen, rejected
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise BadRow("missing field", "'chosen' and 'rejected' must both be strings (with a 'prompt' string) or "
                     f"both lists of messages; got {_show(chosen)} and {_show(rejected)}")
    try:
        chosen = _messages(chosen, "role", "content", "chosen") if chosen else []
        rejected = _messages(rejected, "role", "content", "rejected") if rejected else []
    except ValueError as error:
        reason = "empty response" if "empty assistant turn" in str(error) else "missing field"
        raise BadRow(reason, str(error)) from None
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise BadRow("chosen equals rejected", "'chosen' and 'rejected' are the same conversation")
    if shared:
        context = chosen[:shared]
    elif isinstance(prompt, str) and prompt.strip():
        context = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        try:  # checked as one conversation: the prompt's messages alone need not hold an assistant turn
            context = _messages(prompt + chosen, "role", "content", "prompt + chosen")[:len(prompt)]
        except ValueError as error:
            raise BadRow("missing field", str(error)) from None
    else:
        raise BadRow("missing field", "'chosen' and 'rejected' share no message to be the prompt, and there is no "
                     "'prompt' (a string or a list of messages)")
    replies = []
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        reply = messages[shared:]
        if not reply:
            raise BadRow("empty response", f"{name!r} has no reply after the prompt")
        if len(reply) > 1 or reply[0]["role"] != "assistant":
            raise BadRow("not a pair", f"'chosen' and 'rejected' differ before their last reply (at message "
                         f"{shared + 1}); a pair shares every turn but the final assistant reply")
        replies.append(reply[0])
    return "chat", context, replies[0], replies[1]


def encode_pair(row: dict, tokenization: Tokenization) -> dict[str, list[int]]:
    """prompt_ids, chosen_ids, rejected_ids of one row; each response is the span sft would train."""
    shape, prompt, chosen, rejected = split_row(row)
    sequences = []
    for reply in (chosen, rejected):
        example = {"prompt": prompt, "completion": reply} if shape == "text" else {"messages": prompt + [reply]}
        ids, labels = tokenization.encode(example)
        span = last_trained_span(labels)
        if span is None or span[0] == 0:
            raise BadRow("empty response", "no token of the response is scored (the chat template drops it)")
        sequences.append((ids, span))
    (chosen_ids, (chosen_start, chosen_end)), (rejected_ids, (rejected_start, rejected_end)) = sequences
    # Both responses follow one prompt. Where a tokenizer merges the prompt's last characters into a response's
    # first token, the prompt ends at the earlier of the two starts (as in trl), so no scored token is lost.
    start = min(chosen_start, rejected_start)
    if _common_prefix(chosen_ids, rejected_ids) < start:
        raise BadRow("not a pair", "the chat template renders the prompt differently before the chosen and the "
                     "rejected reply, so they do not answer the same prompt")
    return {"prompt_ids": chosen_ids[:start], "chosen_ids": chosen_ids[start:chosen_end],
            "rejected_ids": rejected_ids[start:rejected_end]}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------- sources and splits


def prepare_pair_source(source: dict, tokenization: Tokenization, data_section: dict, on_bad_rows: str,
                        report: PairReport, seed: int) -> Any:
    """One source's pairs: loaded, renamed, encoded, long pairs handled, sampled by fraction/weight."""
    name = source["path"]
    dataset = load_renamed(source)
    absent = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
    if absent:
        raise DataError(f"{name}: preference pairs need columns chosen and rejected (and prompt, unless chosen and "
                        f"rejected are conversations that share it); the data has {', '.join(dataset.column_names)}. "
                        f"Map yours with columns: {{{absent[0]}: your_column}}")
    if len(dataset) == 0:
        raise DataError(f"{name}: has no rows")

    def encode(row: dict, index: int) -> dict:
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "row": index + 1, "error": "", "reason": ""}
        try:
            out.update(encode_pair(row, tokenization))
        except BadRow as error:
            out.update(error=str(error), reason=error.reason)
        except Exception as error:  # a chat template that raises on this row (jinja `raise_exception`, ...)
            out.update(error=f"the chat template cannot render it: {error}", reason="template error")
        return out

    encoded = dataset.map(encode, with_indices=True, remove_columns=dataset.column_names,
                          desc=f"Tokenizing pairs of {Path(name).name}")
    bad = [(row, error, reason) for row, error, reason in zip(encoded["row"], encoded["error"], encoded["reason"])
           if error]
    if bad and on_bad_rows == "error":
        lines = [f"{name}: row {row}: {error}" for row, error, _ in bad[:MAX_REPORTED_ROW_ERRORS]]
        if len(bad) > MAX_REPORTED_ROW_ERRORS:
            lines.append(f"... and {len(bad) - MAX_REPORTED_ROW_ERRORS} more unusable rows")
        lines.append("(or set preference.on_bad_rows: drop to leave such rows out, counted)")
        raise DataError("\n".join(lines))
    for _, _, reason in bad:
        report.dropped_bad_rows[reason] = report.dropped_bad_rows.get(reason, 0) + 1
    if bad:
        encoded = encoded.filter(lambda row: not row["error"])
    encoded = cut_to_length(encoded, name, data_section, report)
    shape = "preference (conversational)" if dataset[0].get("chosen") is not None and \
        isinstance(dataset[0]["chosen"], list) else "preference (text)"
    encoded = _sample(encoded.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]), source, seed)
    report.sources.append(SourceReport(name=name, format=shape, rows=len(dataset), used_rows=len(encoded),
                                       fingerprint=source_fingerprint(source, dataset)))
    return encoded


def cut_to_length(encoded: Any, name: str, data_section: dict, report: PairReport) -> Any:
    """data.max_length applies to prompt + response, for the chosen and the rejected sequence alike."""
    max_length, truncation = data_section["max_length"], data_section["truncation"]
    longest = [len(p) + max(len(c), len(r))
               for p, c, r in zip(encoded["prompt_ids"], encoded["chosen_ids"], encoded["rejected_ids"])]
    too_long = [(row, n) for row, n in zip(encoded["row"], longest) if n > max_length]
    if not too_long:
        return encoded
    if truncation == "error":
        shown = ", ".join(f"row {row} ({n} tokens)" for row, n in too_long[:10])
        raise DataError(f"{name}: {len(too_long)} pairs longer than data.max_length={max_length} (prompt + the "
                        f"longer response): {shown}. Raise max_length, or set data.truncation: truncate or drop")
    if truncation == "drop":
        report.dropped_too_long += len(too_long)
        return encoded.filter(lambda row: len(row["prompt_ids"]) + max(len(row["chosen_ids"]),
                                                                       len(row["rejected_ids"])) <= max_length)
    # Cut each response where its sequence reaches max_length (trl's keep_start); a prompt that fills it all
    # leaves nothing to score, and the pair is left out.
    kept = encoded.filter(lambda row: len(row["prompt_ids"]) < max_length)
    report.dropped_no_trained_tokens += len(encoded) - len(kept)
    report.truncated += len(too_long) - (len(encoded) - len(kept))

    def shorten(row: dict) -> dict:
        room = max_length - len(row["prompt_ids"])
        return {"chosen_ids": row["chosen_ids"][:room], "rejected_ids": row["rejected_ids"][:room]}

    return kept.map(shorten, desc="Truncating pairs")


def prepare_pair_split(sources: list[dict], tokenization: Tokenization, data_section: dict, on_bad_rows: str,
                       seed: int) -> tuple[Any, PairReport]:
    import datasets

    report = PairReport()
    parts = [prepare_pair_source(s, tokenization, data_section, on_bad_rows, report, seed) for s in sources]
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), report


def summarize(dataset: Any, report: PairReport) -> None:
    report.rows = len(dataset)
    prompts, chosen, rejected = dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
    report.lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
    report.trained_tokens = sum(len(c) + len(r) for c, r in zip(chosen, rejected))
    report.tokens = report.trained_tokens + sum(len(p) for p in prompts)


def prepare_pairs(data_section: dict, tokenizer, on_bad_rows: str = "error", seed: int = 42) -> PreparedPairs:
    """Train (and eval) pairs of token ids, with a report of what was used, cut or left out.

    datasets' own map cache is off: the pairs depend on the tokenizer and chat template, which its cache key
    does not see reliably, and preparing pairs is cheap next to training on them.
    """
    import datasets

    tokenization = Tokenization.for_tokenizer(tokenizer, "completions")
    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        train, train_report = prepare_pair_split(data_section["train"], tokenization, data_section, on_bad_rows,
                                                 seed)
        eval_dataset, eval_report = None, None
        if data_section.get("eval"):
            eval_dataset, eval_report = prepare_pair_split(data_section["eval"], tokenization, data_section,
                                                           on_bad_rows, seed)
        elif data_section.get("eval_fraction") and len(train) > 1:
            split = train.train_test_split(test_size=data_section["eval_fraction"], seed=seed)
            train, eval_dataset = split["train"], split["test"]
            eval_report = PairReport(sources=[SourceReport(name=f"{data_section['eval_fraction']:.0%} of train",
                                                           format="-", rows=len(eval_dataset),
                                                           used_rows=len(eval_dataset), fingerprint="-")])
    finally:
        if was_enabled:
            datasets.enable_caching()
    if len(train) == 0:
        raise DataError("no training pairs left after filtering; check data.max_length and the rows left out")
    summarize(train, train_report)
    reports = {"train": train_report}
    if eval_dataset is not None:
        summarize(eval_dataset, eval_report)
        reports["eval"] = eval_report
    return PreparedPairs(train=train, eval=eval_dataset, reports=reports)
