"""What a GGUF must say about the tokenizer, and the proof that llama.cpp will split text as the model does.

Everything is read from the run's own tokenizer: BOS/EOS, the chat template's end-of-turn token, the stop tokens of
generation_config.json, whether tokenizing adds BOS or EOS. The chat template goes into the GGUF as training used
it, less trl's `{% generation %}` markers: they render nothing, and the Jinja engines of llama.cpp, Ollama's
importers and llama-cpp-python do not know the tag.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Texts the tokenizer checks run on: whitespace runs, digits, contractions, punctuation runs, accents, scripts
# without spaces, emoji and code, so that any difference in how text is cut into words shows.
SAMPLE_TEXTS = [
    "Hello world! How are you today?",
    "\n \n\n \t\t  x   y    z\n\n\n",
    "3 33 333 3333 3.14 1,000,000 2026-05-01 0x1F",
    "I've been told he's there; they'll say we'd, you're, I'm, it's, 'RE 'Ll 'S",
    "!!!???... ------======= '''```\"\"\" (a) [b] {c} <d>",
    "naïve café déjà vu Ünïcödé — “quotes” ‘single’",
    "我想在苹果工作 нещо на Български 日本語のテキスト 한국어 텍스트",
    "🚀 (rocket) 😶\u200d🌫️ ✅ 🦙🦙",
    "def add(a, b):\n    return a + b  # sum\n",
    "   leading spaces and trailing spaces   ",
]
GENERATION_MARKERS = re.compile(r"\{%-?\s*(?:generation|endgeneration)\s*-?%\}")


def plain_chat_template(template: str | None) -> str | None:
    """The chat template without trl's training-only `{% generation %}` markers (which render nothing)."""
    if template is None:
        return None
    return GENERATION_MARKERS.sub("", template)


def read_generation_stops(folder: Path | None) -> list[int]:
    """eos_token_id of the folder's generation_config.json (an id or a list), or nothing."""
    if folder is None or not (folder / "generation_config.json").is_file():
        return []
    try:
        value = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]


def stop_tokens(tokenizer, folder: Path | None, model=None) -> list[int]:
    """Every id a reply ends on: EOS, the chat template's end-of-turn token, the model's and the folder's
    generation_config.json eos ids."""
    from lorakit.models.inference import stop_token_ids

    return sorted(set(stop_token_ids(tokenizer, model)) | set(read_generation_stops(folder)))


def adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when plain text is tokenized, as llama.cpp's add_bos_token/add_eos_token mean."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]
    adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and plain[-1:] != [eos]
    return adds_bos, adds_eos


def tokenizer_settings(tokenizer, stops: list[int]) -> dict:
    """The GGUF tokenizer keys lorakit writes itself (see lorakit.export.llama_cpp_driver)."""
    from lorakit.models.loading import end_of_turn_token

    adds_bos, adds_eos = adds_special_tokens(tokenizer)
    end = end_of_turn_token(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end) if end is not None else None
    eos = tokenizer.eos_token_id
    if eos is None and stops:
        eos = end_id if end_id is not None else stops[0]
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "eot_token_id": end_id,
        "padding_token_id": tokenizer.pad_token_id,
        "add_bos_token": adds_bos,
        "add_eos_token": adds_eos,
        "chat_template": plain_chat_template(tokenizer.chat_template),
    }


def check_texts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """SAMPLE_TEXTS plus the conversations rendered by the chat template (with their special tokens)."""
    texts = list(SAMPLE_TEXTS)
    for messages in conversations:
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def gpt2_split_fits(tokenizer, texts: list[str]) -> str | None:
    """None when llama.cpp's GPT-2 pre-tokenizer gives this tokenizer's ids on every text, else the first difference.

    What llama.cpp does with `tokenizer.ggml.pre = gpt2` is rebuilt here from the tokenizer's own vocabulary and
    merges: byte-level BPE with GPT-2's word-splitting regex, no normalizer, special tokens cut out whole. The
    texts are then tokenized both ways; a tokenizer with another normalizer, splitting rule, byte fallback or
    token-stripping rule shows a difference.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "the tokenizer is not a fast (tokenizers) tokenizer"
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not byte-level BPE"
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    reference = Tokenizer(models.BPE(vocab=model["vocab"], merges=merges))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    reference.decoder = decoders.ByteLevel()
    added = sorted(tokenizer.added_tokens_decoder.items())
    reference.add_special_tokens([AddedToken(token.content, normalized=False, special=True) for _, token in added])
    for text in texts:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        actual = reference.encode(text, add_special_tokens=False).ids
        if expected != actual:
            return f"on {text[:40]!r}: the model's tokenizer gives {expected[:12]}, GPT-2 splitting {actual[:12]}"
    return None
