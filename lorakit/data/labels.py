"""Token ids and training labels of one example: what the model sees, and which of its tokens are trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100  # the label of a token that is not trained (the loss functions' ignore_index)


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
