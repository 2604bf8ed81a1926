"""Each row format (messages, sharegpt, alpaca, prompt_completion, text) mapped to chat messages or text.

A conversation comes out as {"messages": [...]} (plus "tools" when the row lists tools), with every message in
the shape chat templates read: role and content; an assistant's `tool_calls` as OpenAI-style
{"type": "function", "function": {"name", "arguments"}} with arguments as an object; `reasoning_content`;
a tool result's `tool_call_id` and `name`. An assistant turn left out of training carries `train: False`
(lorakit's key, taken off before the template sees the message).
"""

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
# Keys of a message passed on to the chat template as they are (strings), besides role and content.
PASSED_KEYS = {"assistant": ("reasoning_content",), "tool": ("tool_call_id", "name")}


def row_to_example(row: dict, fmt: str) -> dict:
    """Map one row to {'messages': [...]}, {'prompt': str, 'completion': str} or {'text': str}.

    Raises ValueError with what is wrong with the row.
    """
    if fmt == "messages":
        example = {"messages": _messages(row.get("messages"), "role", "content", "messages")}
        tools = row.get("tools")
        if tools is not None:
            example["tools"] = _tools(tools)
        return example
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
            # As in trl: only the completion is trained; an assistant turn inside the prompt is context.
            messages = _messages(prompt + completion, "role", "content", "prompt + completion")
            for message in messages[:len(prompt)]:
                if message["role"] == "assistant":
                    message["train"] = False
            if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
                raise ValueError("'completion' holds no assistant turn to learn from")
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
        role = message.get(role_key)
        if role not in ROLE_ALIASES:
            raise ValueError(f"message {index} has role {_show(role)}; expected one of {', '.join(ROLE_ALIASES)}")
        messages.append(_message(message, index, ROLE_ALIASES[role], content_key))
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        if any(m["role"] == "assistant" for m in messages):
            raise ValueError("has no assistant turn to learn from: every assistant turn is left out (train: false "
                             "or weight: 0)")
        raise ValueError("has no assistant turn to learn from")
    return messages


def _message(message: dict, index: int, role: str, content_key: str) -> dict:
    """One message in the shape chat templates read. Keys a row does not set come from Arrow as None: skipped."""
    content = message.get(content_key)
    calls = _tool_calls(message.get("tool_calls"), index) if role == "assistant" else []
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({role}) has no text in {content_key!r}")
    if role == "assistant" and not content.strip() and not calls:
        raise ValueError(f"message {index} is an empty assistant turn")
    out: dict[str, Any] = {"role": role}
    if content or not calls:  # a tool-call turn without text has no content key, as templates expect
        out["content"] = content
    if calls:
        out["tool_calls"] = calls
    for key in PASSED_KEYS.get(role, ()):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"message {index} ({role}): {key!r} must be a string, got {_show(value)}")
            out[key] = value
    if not _trained(message, index, role):
        out["train"] = False
    return out


def _trained(message: dict, index: int, role: str) -> bool:
    """A message's `train` (true/false) or `weight` (1/0), as peers spell it; only assistant turns are trained."""
    train, weight = message.get("train"), message.get("weight")
    if train is not None and not isinstance(train, bool):
        raise ValueError(f"message {index}: 'train' must be true or false, got {_show(train)}")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise ValueError(f"message {index}: 'weight' must be 0 (leave the turn out) or 1, got {_show(weight)}")
    wanted = [value for value in (train, None if weight is None else bool(weight)) if value is not None]
    if len(set(wanted)) > 1:
        raise ValueError(f"message {index}: 'train' and 'weight' disagree; give one of them")
    if role != "assistant" and True in wanted:
        raise ValueError(f"message {index} ({role}): only assistant turns are trained; remove its "
                         f"{'train' if train is not None else 'weight'} key")
    return role == "assistant" and (not wanted or wanted[0])


def _tool_calls(value: Any, index: int) -> list[dict]:
    """An assistant's tool calls as {"type": "function", "function": {"name", "arguments"}} (+ "id")."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"message {index}: 'tool_calls' must be a list, got {_show(value)}")
    calls = []
    for number, call in enumerate(value, 1):
        where = f"message {index}, tool call {number}"
        if not isinstance(call, dict):
            raise ValueError(f"{where} must be an object with 'function' (name and arguments)")
        function = call.get("function") if call.get("function") is not None else call
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where} has no function name")
        if isinstance(arguments, str):  # JSON text keeps a null argument; Arrow's objects cannot (see _drop_none)
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} ({name}): 'arguments' is not valid JSON ({error.msg})") from None
        elif isinstance(arguments, dict):
            arguments = _drop_none(arguments)
        elif arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ValueError(f"{where} ({name}): 'arguments' must be an object, got {_show(arguments)}")
        out = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            out["id"] = str(call["id"])
        calls.append(out)
    return calls


def _tools(value: Any) -> list[dict]:
    """The row's tool schemas, as the template's `tools` argument."""
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise ValueError(f"'tools' must be a list of tool schemas (objects), got {_show(value)}")
    return [_drop_none(tool) for tool in value]


def _drop_none(value: Any) -> Any:
    """Objects without their null values. Arrow (datasets) gives every object of a column the keys of all rows,
    the missing ones as null, so a null here is almost always a key the row never had."""
    if isinstance(value, dict):
        return {key: _drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_none(item) for item in value]
    return value


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."
