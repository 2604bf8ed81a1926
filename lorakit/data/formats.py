"""Each row format (messages, sharegpt, alpaca, prompt_completion, text) mapped to chat messages or text."""

from __future__ import annotations

import json
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
