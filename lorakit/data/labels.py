"""Token ids and training labels of one example: what the model sees, and which of its tokens are trained.

A conversation is rendered by its chat template once, and tokenized once with character offsets. Each assistant
turn is then found in that one text:

- where its reply starts: right after the text the template writes to hand a turn to the model, the end of the
  message before it plus the generation prompt (`<|im_end|>\\n<|im_start|>assistant\\n`, `[/INST]`, ...). lorakit
  learns that text by rendering the conversation up to the turn with a placeholder in the message before it;
- its payload, in order: reasoning, content, tool calls (name and arguments), each as written or as the template
  trims it (surrounding whitespace), or, for content holding a `<think>...</think>` block, as the template
  splits it into reasoning and answer;
- the end-of-turn token that closes it: the first special token after the payload, when it is EOS or the chat
  template's end-of-turn token.

Trained: every token from the reply's start to that end-of-turn token, inclusive, which is what the model must
write after the generation prompt to produce this rendering. That includes text the template puts between the
generation prompt and the content (Qwen3's empty `<think>\\n\\n</think>\\n\\n`, Mistral's space, `<tool_call>`,
`[TOOL_CALLS]`); it never includes a system, user or tool message, a header, or text injected before it.
A template may rewrite history (drop reasoning from earlier turns, move the system prompt) without harm, since
only the one rendering is read. What cannot be found exactly is a ValueError naming the template, never a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IGNORE = -100  # the label of a token that is not trained (the loss functions' ignore_index)
PLACEHOLDER = "lorakitplaceholder"  # stands in for the message before a reply while its hand-over text is learnt


@dataclass
class Reply:
    """Where one assistant turn lies in the rendered text (character offsets) and whether a stop token closes it."""

    message: int  # its index in the conversation
    start: int  # where the model takes over: right after the generation prompt
    opening: int  # where the hand-over text (end of the message before + generation prompt) starts
    payload_end: int
    end: int = -1  # after its end-of-turn token; payload_end when none closes it
    closed: bool = False


@dataclass
class Tokenization:
    """What a tokenized row needs to know about the tokenizer; built once per run."""

    tokenizer: Any
    train_on: str
    stop_ids: tuple[int, ...]

    @classmethod
    def for_tokenizer(cls, tokenizer, train_on: str) -> "Tokenization":
        from lorakit.models.loading import end_of_turn_token

        stops = {tokenizer.eos_token_id}
        end = end_of_turn_token(tokenizer)
        if end is not None:
            stops.add(tokenizer.convert_tokens_to_ids(end))
        return cls(tokenizer, train_on, tuple(sorted(i for i in stops if i is not None)))

    @property
    def template_name(self) -> str:
        return f"the chat template of {self.tokenizer.name_or_path or 'the tokenizer'}"

    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                 return_dict=True)
        return list(out["input_ids"])

    def encode(self, example: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with IGNORE on every token not trained."""
        if "text" in example:
            ids = self.tokenizer(example["text"], add_special_tokens=True)["input_ids"]
            ids = self._with_eos(ids)
            return ids, list(ids)
        if "prompt" in example:
            return self._encode_completion(example["prompt"], example["completion"])
        ids, labels, _ = self.encode_chat(example)
        return ids, labels

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else list(ids)

    def _encode_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """Prompt and completion tokenized as one text; trained: every token reaching into the completion, and EOS."""
        encoded = self.tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
        ids = self._with_eos(list(encoded["input_ids"]))
        if self.train_on == "all":
            return ids, list(ids)
        labels = [token if end > len(prompt) else IGNORE for token, (_, end) in zip(ids, encoded["offset_mapping"])]
        labels += ids[len(labels):]
        if ids[-1] == self.tokenizer.eos_token_id:
            labels[-1] = ids[-1]  # the EOS that ends the completion, appended here or by the tokenizer
        return ids, labels

    # ------------------------------------------------------------ conversations

    def encode_chat(self, example: dict) -> tuple[list[int], list[int], list[Reply]]:
        """(input_ids, labels, replies) of a conversation, from one rendering of it."""
        messages = [{key: value for key, value in m.items() if key != "train"} for m in example["messages"]]
        tools = example.get("tools") or None
        self._check_tool_support(messages, tools)
        text = self.render(messages, tools)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        if tools:
            missing = [name for name in tool_names(tools) if name not in text]
            if missing:
                raise ValueError(f"{self.template_name} does not render the row's tools list (no {missing[0]!r} in "
                                 "its output): it has no tool support. Set model.chat_template to a template that "
                                 "renders tools")
        if self.train_on == "all":
            return ids, list(ids), []
        replies = self.find_replies(messages, tools, text, offsets, ids)
        labels = [IGNORE] * len(ids)
        trained = {index for index, m in enumerate(example["messages"]) if m.get("train", True)}
        for reply in replies:
            if reply.message in trained:
                for position, (start, end) in enumerate(offsets):
                    if end > reply.start and start < reply.end and end > start:
                        labels[position] = ids[position]
        return ids, labels, replies

    def _check_tool_support(self, messages: list[dict], tools: list | None) -> None:
        template = self.tokenizer.chat_template or ""
        if any(m.get("tool_calls") for m in messages) and "tool_calls" not in template:
            raise ValueError(f"has tool calls, but {self.template_name} has no tool support (it never reads "
                             "'tool_calls'). Set model.chat_template to a template that renders them")
        if tools and "tools" not in template:
            raise ValueError(f"has a tools list, but {self.template_name} has no tool support (it never reads "
                             "'tools'). Set model.chat_template to a template that renders them")

    def find_replies(self, messages: list[dict], tools: list | None, text: str, offsets: list, ids: list[int]
                     ) -> list[Reply]:
        """Every assistant turn of the rendered `text`, in order; a ValueError where one cannot be placed exactly."""
        replies: list[Reply] = []
        cursor = 0
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            opening, start = self._reply_start(messages, index, tools, text, cursor)
            # The reply's text lies before the first end-of-turn token after its start.
            limit = next((a for a, b in ((a, b) for (a, b), i in zip(offsets, ids) if i in self.stop_ids)
                          if a >= start), len(text))
            payload_end = self._payload_end(message, index, text[:limit], start, after_last_user=index > last_user)
            replies.append(Reply(index, start, opening, payload_end))
            cursor = payload_end
        special = set(self.tokenizer.all_special_ids)
        for number, reply in enumerate(replies):
            # The end-of-turn token must come before whatever follows: the next message's text, the next reply.
            bound = replies[number + 1].opening if number + 1 < len(replies) else len(text)
            following = messages[reply.message + 1] if reply.message + 1 < len(messages) else {}
            if following.get("role") != "assistant" and (following.get("content") or "").strip():
                found = text.find(following["content"].strip(), reply.payload_end, bound)
                bound = found if found >= 0 else bound
            reply.end = reply.payload_end
            for position, (a, b) in enumerate(offsets):
                if b <= reply.payload_end or b <= a:
                    continue
                if a >= bound or (ids[position] in special and ids[position] not in self.stop_ids):
                    break  # the next turn, or a control token that is not a stop: the turn is never closed
                if ids[position] in self.stop_ids:
                    reply.end, reply.closed = b, True
                    break
        return replies

    def _reply_start(self, messages: list[dict], index: int, tools, text: str, cursor: int) -> tuple[int, int]:
        """(where the hand-over text starts, where the reply starts) for the assistant turn `messages[index]`."""
        handover = self._handover(messages, index, tools)
        found = text.find(handover, cursor)
        if found >= 0:
            return found, found + len(handover)
        # The generation prompt may end with text the rendered turn lacks (DeepSeek-R1's `<think>\n`): the longest
        # part of it, in whole tokens, that the rendered turn has, provided the reply then follows it at once.
        encoded = self.tokenizer(handover, add_special_tokens=False, return_offsets_mapping=True)
        for _, cut in reversed(encoded["offset_mapping"][:-1]):
            part = handover[:cut]
            found = text.find(part, cursor)
            if found >= 0 and self._payload_at(messages[index], text, found + len(part)):
                return found, found + len(part)
        raise ValueError(f"message {index + 1}: cannot tell where this reply starts: {self.template_name} does not "
                         f"put the text it hands a turn to the model with ({handover[-40:]!r}) before it")

    def _handover(self, messages: list[dict], index: int, tools) -> str:
        """The text between the end of the message before a reply and the reply: that message's closing and the
        generation prompt, learnt by rendering the conversation up to the reply with a placeholder in that message."""
        before = [dict(m) for m in messages[:index]]
        if before:
            before[-1]["content"] = PLACEHOLDER
        try:
            rendered = self.render(before, tools, add_generation_prompt=True)
        except Exception as error:  # a template that refuses a conversation ending there (jinja raise_exception)
            raise ValueError(f"message {index + 1}: {self.template_name} cannot render the conversation before this "
                             f"reply with a generation prompt, which lorakit needs to find where it starts: "
                             f"{error}") from None
        if not before:
            return rendered
        cut = rendered.rfind(PLACEHOLDER)
        if cut < 0:
            raise ValueError(f"message {index + 1}: {self.template_name} rewrites the text of message {index}, so "
                             "lorakit cannot tell where the reply after it starts")
        return rendered[cut + len(PLACEHOLDER):]

    def _payload_at(self, message: dict, text: str, position: int) -> bool:
        """Whether the reply's payload starts at `position` (after whitespace at most); reasoning may be dropped."""
        rest = text[position:].lstrip()
        for plan in filter(None, payload_plans(message)):
            firsts = plan[0][1] + (plan[1][1] if plan[0][0] == "reasoning" and len(plan) > 1 else [])
            if any(rest.startswith(form.lstrip()) for form in firsts if form.strip()):
                return True
        return False

    def _payload_end(self, message: dict, index: int, text: str, start: int, after_last_user: bool) -> int:
        """Where the reply's payload ends: its reasoning, content and tool calls, in order after `start`."""
        plans = payload_plans(message)
        failure = ""
        for plan in plans:
            position, dropped = start, False
            for kind, forms in plan:
                found = min(((text.find(form, position), form) for form in forms if form and form in text[position:]),
                            default=None)
                if found is not None:
                    position = found[0] + len(found[1])
                elif kind == "reasoning":
                    dropped = True
                else:
                    failure = failure or f"{kind} as written (no {forms[-1][:40]!r} after its start)"
                    break
            else:
                if dropped and after_last_user:
                    raise ValueError(f"message {index + 1}: {self.template_name} drops the reasoning of this "
                                     "reply, so it would not be trained. Use a template that renders it "
                                     "(model.chat_template), or leave the reasoning out of the data")
                return position
        raise ValueError(f"message {index + 1}: {self.template_name} does not render this reply's {failure}, so "
                         "lorakit cannot tell which tokens are the reply; it trains nothing it cannot place exactly")


def payload_plans(message: dict) -> list[list[tuple[str, list[str]]]]:
    """The ways a template may write an assistant message, each a list of (kind, accepted forms) in order:
    reasoning, content, tool calls. A text is accepted as written or trimmed of surrounding whitespace; content
    holding a `<think>...</think>` block also as the template splits it (Qwen3, DeepSeek-R1): reasoning, answer."""
    reasoning, content = message.get("reasoning_content"), message.get("content") or ""
    calls = _call_pieces(message)
    head = [("reasoning", [reasoning.strip()])] if isinstance(reasoning, str) and reasoning.strip() else []
    plans = [head + ([("content", [content, content.strip()])] if content.strip() else []) + calls]
    if "</think>" in content and not head:
        thought, _, answer = content.partition("</think>")
        thought, answer = thought.split("<think>")[-1].strip(), answer.strip()
        split = ([("reasoning", [thought])] if thought else []) + ([("content", [answer])] if answer else [])
        plans.append(split + calls)
    return plans


def _call_pieces(message: dict) -> list[tuple[str, list[str]]]:
    pieces = []
    for call in message.get("tool_calls") or ():
        function = call["function"]
        pieces.append(("tool call", [function["name"]]))
        if function["arguments"]:
            pieces.append(("tool call arguments", [json.dumps(function["arguments"], ensure_ascii=False)]))
    return pieces


def tool_names(tools: list[dict]) -> list[str]:
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def last_trained_span(labels: list[int]) -> tuple[int, int] | None:
    """[start, end) of the last run of trained (not IGNORE) labels: the last reply and its end-of-turn token."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end
