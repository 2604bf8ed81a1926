"""Load data sources, map each format to chat messages or text, tokenize with the chat template, mix and split.

lorakit tokenizes and builds the labels itself, with the same tokenizer calls trl
makes (`apply_chat_template`), and hands trl rows of `input_ids` and `labels`
(trl then only packs or pads them). Doing it here is what lets lorakit name the
file and row of every unusable example, count the rows it truncated or dropped,
mix text with chat data, and show in `lorakit validate` exactly the tokens that
will be trained.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
IGNORE = -100
MAX_REPORTED_ROW_ERRORS = 20


class DataError(Exception):
    """Data that cannot be used, named by file and row."""


@dataclass
class SourceReport:
    name: str
    format: str
    rows: int
    used_rows: int
    fingerprint: str


@dataclass
class SplitReport:
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)
    sources: list[SourceReport] = field(default_factory=list)

    def length_stats(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
        return {"min": ordered[0], "median": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
            "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
            "dropped_no_trained_tokens": self.dropped_no_trained_tokens, "length": self.length_stats(),
            "sources": [s.__dict__ for s in self.sources],
        }


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    reports: dict[str, SplitReport]


# ---------------------------------------------------------------- loading


def load_source(source: dict) -> Any:
    """A datasets.Dataset for one recipe source: a local file or folder, or a Hub dataset."""
    import datasets

    path = source["path"]
    local = Path(path)
    try:
        if local.is_file():
            loader = LOADERS.get(local.suffix.lower())
            if loader is None:
                raise DataError(f"{path}: unsupported file type {local.suffix!r}; use one of {', '.join(LOADERS)}")
            return datasets.load_dataset(loader, data_files=str(local), split="train")
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.suffix.lower() in LOADERS)
            if not files:
                raise DataError(f"{path}: folder holds no data files ({', '.join(LOADERS)})")
            kinds = {LOADERS[p.suffix.lower()] for p in files}
            if len(kinds) > 1:
                raise DataError(f"{path}: folder mixes file types ({', '.join(sorted(kinds))}); give the files "
                                "as separate sources")
            return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
        return datasets.load_dataset(path, name=source.get("name"), split=source.get("split", "train"),
                                     revision=source.get("revision"))
    except DataError:
        raise
    except Exception as error:  # datasets' own errors are long and deep; say what and where
        raise DataError(_explain_load_error(path, error)) from None


def _explain_load_error(path: str, error: Exception) -> str:
    local = Path(path)
    if local.is_file() and local.suffix.lower() in (".json", ".jsonl"):
        bad = _first_bad_json_line(local)
        if bad:
            return f"{path}: row {bad[0]} is not valid JSON ({bad[1]})"
    if not local.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"{path}: not a local file or folder, and the Hub is off (HF_HUB_OFFLINE=1), so it cannot be downloaded"
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{path}: cannot be loaded: {message}"


def _first_bad_json_line(file: Path) -> tuple[int, str] | None:
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as error:
            return error.lineno, error.msg
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                return number, error.msg
            if not isinstance(value, dict):
                return number, "each line must be a JSON object"
    return None


def detect_format(columns: list[str], name: str) -> str:
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    raise DataError(f"{name}: cannot tell the format from its columns ({', '.join(columns)}). Columns expected per "
                    f"format: {expected}. Set format: and columns: {{format_name: your_column}} on the source.")


# ---------------------------------------------------------------- one row -> messages or text


def row_to_example(row: dict, fmt: str) -> dict:
    """Map one row to {'messages': [...]}, {'prompt': str, 'completion': str} or {'text': str}.

    Raises ValueError with what is wrong with the row.
    """
    if fmt == "messages":
        return {"messages": _messages(row.get("messages"), "role", "content", "messages")}
    if fmt == "sharegpt":
        return {"messages": _messages(row.get("conversations"), "from", "value", "conversations")}
    if fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        extra, system = row.get("input") or "", row.get("system") or ""
        for key, value in (("instruction", instruction), ("output", output)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"'{key}' must be a non-empty string, got {_show(value)}")
        if not isinstance(extra, str) or not isinstance(system, str):
            raise ValueError("'input' and 'system' must be strings when present")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": messages}
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = _messages(prompt + completion, "role", "content", "prompt + completion")
            return {"messages": messages}
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings, or both lists of messages")
        if not completion.strip():
            raise ValueError("'completion' is empty")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"'text' must be a non-empty string, got {_show(text)}")
        return {"text": text}
    raise ValueError(f"unknown format {fmt}")


def _messages(value: Any, role_key: str, content_key: str, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{column}' must be a non-empty list of messages, got {_show(value)}")
    messages = []
    for index, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be an object with {role_key!r} and {content_key!r}")
        role, content = message.get(role_key), message.get(content_key)
        if role not in ROLE_ALIASES:
            raise ValueError(f"message {index} has role {_show(role)}; expected one of {', '.join(ROLE_ALIASES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {index} ({role}) has no text in {content_key!r}")
        role = ROLE_ALIASES[role]
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {index} is an empty assistant turn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant turn to learn from")
    return messages


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- tokenization with labels


@dataclass
class Tokenization:
    """What a tokenized row needs to know about the tokenizer; built once per run."""

    tokenizer: Any
    train_on: str
    stop_ids: tuple[int, ...]

    @classmethod
    def for_tokenizer(cls, tokenizer, train_on: str) -> "Tokenization":
        from lorakit.model import end_of_turn_token

        stops = {tokenizer.eos_token_id}
        end = end_of_turn_token(tokenizer)
        if end is not None:
            stops.add(tokenizer.convert_tokens_to_ids(end))
        return cls(tokenizer, train_on, tuple(sorted(i for i in stops if i is not None)))

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                 return_dict=True)
        return list(out["input_ids"])

    def encode(self, example: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with IGNORE on every token not trained."""
        tokenizer = self.tokenizer
        if "text" in example:
            ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids = ids + [tokenizer.eos_token_id]
            return ids, list(ids)
        if "prompt" in example:
            prompt = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
            ids = tokenizer(example["prompt"] + example["completion"], add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            if self.train_on == "all":
                return ids, list(ids)
            start = _common_prefix(prompt, ids)
            return ids, [IGNORE] * start + ids[start:]
        messages = example["messages"]
        ids = self.chat_ids(messages)
        if self.train_on == "all":
            return ids, list(ids)
        labels = [IGNORE] * len(ids)
        # Each assistant turn is what the template adds between the conversation before it (with the
        # generation prompt) and the conversation including it: template-agnostic, no generation markers needed.
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.chat_ids(messages[:index], add_generation_prompt=True) if index else []
            upto = self.chat_ids(messages[: index + 1])
            start = _common_prefix(before, upto)
            end = _common_prefix(upto, ids) if index + 1 < len(messages) else len(ids)
            end = self._cut_after_stop(ids, start, end)
            labels[start:end] = ids[start:end]
        return ids, labels

    def _cut_after_stop(self, ids: list[int], start: int, end: int) -> int:
        """End the trained span at the turn's end-of-turn token: what follows it is the template's separator."""
        for position in range(start, end):
            if ids[position] in self.stop_ids:
                return position + 1
        return end


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------- the pipeline


def prepare_source(source: dict, tokenization: Tokenization, max_length: int, truncation: str,
                   report: SplitReport, seed: int) -> Any:
    """One source: loaded, each row mapped and tokenized, long rows handled, sampled by fraction/weight."""
    import datasets

    name = source["path"]
    dataset = load_source(source)
    renames = {src: dst for dst, src in (source.get("columns") or {}).items()}
    missing = [src for src in renames if src not in dataset.column_names]
    if missing:
        raise DataError(f"{name}: columns: names {', '.join(missing)}, which the data does not have "
                        f"(it has {', '.join(dataset.column_names)})")
    if renames:
        dataset = dataset.rename_columns(renames)
    fmt = source.get("format") or detect_format(dataset.column_names, name)
    needed = [c for c in FORMAT_COLUMNS[fmt] if c not in dataset.column_names]
    if needed:
        raise DataError(f"{name}: format {fmt} needs column(s) {', '.join(needed)}; the data has "
                        f"{', '.join(dataset.column_names)} (map yours with columns: {{{needed[0]}: your_column}})")
    if len(dataset) == 0:
        raise DataError(f"{name}: has no rows")

    def encode(row: dict, index: int) -> dict:
        try:
            example = row_to_example(row, fmt)
            ids, labels = tokenization.encode(example)
        except ValueError as error:
            return {"input_ids": [], "labels": [], "row": index + 1, "error": str(error), "length": 0}
        except Exception as error:  # a chat template that raises on this row (jinja `raise_exception`, ...)
            return {"input_ids": [], "labels": [], "row": index + 1, "length": 0,
                    "error": f"the chat template cannot render it: {error}"}
        return {"input_ids": ids, "labels": labels, "row": index + 1, "error": "", "length": len(ids)}

    encoded = dataset.map(encode, with_indices=True, remove_columns=dataset.column_names,
                          desc=f"Tokenizing {Path(name).name}")
    errors = [(r, e) for r, e in zip(encoded["row"], encoded["error"]) if e]
    if errors:
        lines = [f"{name}: row {row}: {message}" for row, message in errors[:MAX_REPORTED_ROW_ERRORS]]
        more = len(errors) - MAX_REPORTED_ROW_ERRORS
        if more > 0:
            lines.append(f"... and {more} more unusable rows")
        raise DataError("\n".join(lines))

    lengths = encoded["length"]
    too_long = [(row, n) for row, n in zip(encoded["row"], lengths) if n > max_length]
    if too_long and truncation == "error":
        shown = ", ".join(f"row {r} ({n} tokens)" for r, n in too_long[:10])
        raise DataError(f"{name}: {len(too_long)} rows longer than data.max_length={max_length}: {shown}. "
                        "Raise max_length, or set data.truncation: truncate or drop")

    def shorten(row: dict) -> dict:
        return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}

    if too_long and truncation == "drop":
        encoded = encoded.filter(lambda row: row["length"] <= max_length)
        report.dropped_too_long += len(too_long)
    elif too_long:
        encoded = encoded.map(shorten, desc="Truncating")
        report.truncated += len(too_long)
    trained = encoded.filter(lambda row: any(label != IGNORE for label in row["labels"]))
    report.dropped_no_trained_tokens += len(encoded) - len(trained)
    encoded = _sample(trained.select_columns(["input_ids", "labels"]), source, seed)
    report.sources.append(SourceReport(name=name, format=fmt, rows=len(dataset), used_rows=len(encoded),
                                       fingerprint=source_fingerprint(source, dataset)))
    del datasets
    return encoded


def _sample(dataset: Any, source: dict, seed: int) -> Any:
    """Apply a source's fraction (subsample) or weight (repeat factor), seeded."""
    import datasets

    factor = source.get("fraction") or source.get("weight")
    if not factor or factor == 1:
        return dataset
    whole, part = int(factor), factor - int(factor)
    pieces = [dataset] * whole
    count = int(round(part * len(dataset)))
    if count:
        pieces.append(dataset.shuffle(seed=seed).select(range(count)))
    return datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]


def source_fingerprint(source: dict, dataset: Any) -> str:
    """sha256 of a local file's bytes, else the dataset's own fingerprint (Hub revision + content)."""
    path = Path(source["path"])
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return "sha256:" + digest.hexdigest()
    return "datasets:" + str(getattr(dataset, "_fingerprint", "unknown"))


def prepare_split(sources: list[dict], tokenization: Tokenization, data_section: dict, seed: int) -> tuple[Any, SplitReport]:
    import datasets

    report = SplitReport()
    parts = [prepare_source(s, tokenization, data_section["max_length"], data_section["truncation"], report, seed)
             for s in sources]
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return dataset, report


def summarize(dataset: Any, report: SplitReport) -> None:
    report.rows = len(dataset)
    report.lengths = [len(ids) for ids in dataset["input_ids"]]
    report.tokens = sum(report.lengths)
    report.trained_tokens = sum(sum(1 for label in labels if label != IGNORE) for labels in dataset["labels"])


def prepare_data(data_section: dict, tokenizer, seed: int = 42) -> PreparedData:
    """Train (and eval) datasets of input_ids and labels, with a report of what was used, cut or left out."""
    tokenization = Tokenization.for_tokenizer(tokenizer, data_section["train_on"])
    train, train_report = prepare_split(data_section["train"], tokenization, data_section, seed)
    eval_dataset, eval_report = None, None
    if data_section.get("eval"):
        eval_dataset, eval_report = prepare_split(data_section["eval"], tokenization, data_section, seed)
    elif data_section.get("eval_fraction"):
        split = train.train_test_split(test_size=data_section["eval_fraction"], seed=seed)
        train, eval_dataset = split["train"], split["test"]
        eval_report = SplitReport(sources=[SourceReport(name=f"{data_section['eval_fraction']:.0%} of train",
                                                        format="-", rows=len(eval_dataset),
                                                        used_rows=len(eval_dataset), fingerprint="-")])
    if len(train) == 0:
        raise DataError("no training rows left after truncation and filtering; raise data.max_length")
    summarize(train, train_report)
    reports = {"train": train_report}
    if eval_dataset is not None:
        summarize(eval_dataset, eval_report)
        reports["eval"] = eval_report
    return PreparedData(train=train, eval=eval_dataset, reports=reports)
