"""The proof an export answers like the fine-tuned model: the GGUF loaded back and compared, figures recorded.

The fine-tuned model's greedy replies to the check conversations are measured first, and its logits over each
prompt + reply. The GGUF is then read back by transformers (`gguf_file=`, weights dequantized to float32) and
compared on exactly those tokens: its metadata (chat template, BOS/EOS/end-of-turn), its tokenizer (the same ids as
the model's on fixed texts and the rendered conversations), its logits (within the tolerance of the GGUF type)
and its own greedy replies, which must stop where the model's stop. Where llama-cpp-python is installed, llama.cpp
itself runs the GGUF too (lorakit.export.llama_cpp_check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

MAX_NEW_TOKENS = 24
# Float types: logits within the bound `lorakit merge` uses for the same rounding of the weights (see TOLERANCES
# there), combined with the reference's own dtype. Quantized types change the function on purpose, so they are
# held to a mean KL divergence from the model's next-token distribution (top-1 agreement is recorded, but on a
# model whose logits are close together, as a barely trained one's are, it flips on rounding alone). Measured on
# SmolLM2-135M-Instruct: q8_0 mean KL 0.0020 (top-1 agreement 98.9%), q4_k_m 0.069 (91.4%); on a 2-layer random
# model q8_0 2.2e-5, q4_k_m 1.3e-3. q8_0's bound leaves a 10x margin; other types get a bound that only a broken
# conversion or a wrong tokenizer (several nats) exceeds, not a quality bar.
FLOAT_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
KL_BOUNDS = {"q8_0": 0.02}
DEFAULT_KL_BOUND = 0.5


@dataclass
class Reference:
    """What the fine-tuned model answers on the check conversations."""

    prompts: list[list[int]]
    replies: list[list[int]]
    stopped: list[bool]
    sequences: list[list[int]]  # prompt + reply (+ the stop token when it stopped)
    logits: list  # float32 tensors over each sequence
    dtype: str


def measure(model, tokenizer, conversations: list[list[dict]], stops: list[int]) -> Reference:
    from lorakit.models.inference import chat_prompt_ids
    from lorakit.models.merge import logits_of

    click.echo(f"  measuring the fine-tuned model on {len(conversations)} conversations")
    prompts = [chat_prompt_ids(tokenizer, messages) for messages in conversations]
    replies, stopped = greedy(model, prompts, stops, tokenizer.pad_token_id)
    sequences = [p + r + ([s] if s is not None else []) for p, r, s in zip(prompts, replies, stopped)]
    logits = [logits_of(model, ids) for ids in sequences]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return Reference(prompts, replies, [s is not None for s in stopped], sequences, logits, dtype)


def greedy(model, prompts: list[list[int]], stops: list[int], pad: int | None) -> tuple[list, list]:
    """Greedy replies, one prompt at a time (no padding), and the stop token each ended on (None: cut short)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stops,
                              pad_token_id=pad if pad is not None else stops[0])
    device = next(model.parameters()).device
    replies, ended = [], []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt], device=device),
                                 attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=device),
                                 generation_config=config)[0, len(prompt):].tolist()
        cut = next((i for i, token in enumerate(out) if token in stops), None)
        replies.append(out if cut is None else out[:cut])
        ended.append(None if cut is None else out[cut])
    return replies, ended


def verify_gguf(file: Path, reference: Reference, quant: str, settings: dict, tokenizer,
                conversations: list[list[dict]]) -> dict:
    """Figures for the GGUF against the reference; `passed` and, when not, `problems` saying why."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.export.vocabulary import check_texts
    from lorakit.models.inference import stop_token_ids
    from lorakit.models.merge import compare_logits, logits_of

    click.echo(f"  reading {file.name} back with transformers")
    problems = check_metadata(file, settings)
    gguf_tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    texts = check_texts(tokenizer, conversations)
    differing = [text for text in texts
                 if gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
                 != tokenizer(text, add_special_tokens=False)["input_ids"]]
    if differing:
        problems.append(f"its tokenizer splits {len(differing)} of {len(texts)} check texts differently from the "
                        f"model's, e.g. {differing[0][:40]!r}")
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    logits = [logits_of(model, ids) for ids in reference.sequences]
    del model
    figures = compare_logits(reference.logits, logits)
    gguf_stops = stop_token_ids(gguf_tokenizer, None)
    # The GGUF's greedy reply is the model's exactly when, fed the model's reply, it picks each next token of it
    # (the stop token included): so the teacher-forced logits give the greedy comparison without generating.
    agree = [greedy_agreement(prompt, sequence, values)
             for prompt, sequence, values in zip(reference.prompts, reference.sequences, logits)]
    same = sum(first is None for first in agree)
    stop_kept = [sequence[-1] in gguf_stops for sequence, stopped in zip(reference.sequences, reference.stopped)
                 if stopped]
    figures.update(conversations=len(reference.prompts), positions=sum(len(s) for s in reference.sequences),
                   greedy_replies_identical=same, greedy_max_new_tokens=MAX_NEW_TOKENS,
                   greedy_first_difference=[first for first in agree if first is not None],
                   model_replies_stopped=sum(reference.stopped),
                   tokenizer_texts_identical=len(texts) - len(differing), tokenizer_texts=len(texts),
                   gguf_stop_token_ids=gguf_stops, reference_dtype=reference.dtype)
    problems += judge(figures, quant, reference.dtype)
    if not all(stop_kept):
        problems.append("a stop token the model's replies end on is not an end-of-generation token of the GGUF "
                        f"(its stop ids: {gguf_stops})")
    figures.update(passed=not problems, problems=problems)
    print_figures(figures)
    return figures


def greedy_agreement(prompt: list[int], sequence: list[int], logits) -> int | None:
    """None when the argmax at every reply position is the reply's next token, else the first reply position
    where it is not."""
    picks = logits[len(prompt) - 1:len(sequence) - 1].argmax(-1).tolist()
    return next((i for i, (pick, token) in enumerate(zip(picks, sequence[len(prompt):])) if pick != token), None)


def judge(figures: dict, quant: str, reference_dtype: str) -> list[str]:
    """What is out of bounds for this GGUF type; the bounds used are added to `figures`."""
    from lorakit.models.merge import TOLERANCES

    if quant in FLOAT_DTYPES:
        relative, max_kl = TOLERANCES[FLOAT_DTYPES[quant]]
        own = TOLERANCES.get(reference_dtype, TOLERANCES["float32"])
        relative, max_kl = max(relative, own[0]), max(max_kl, own[1])
        bound = relative * max(1.0, figures["max_abs_logit"])
        figures["tolerance"] = {"max_abs_diff": bound, "relative_to_max_logit": relative, "mean_kl": max_kl}
        if figures["max_abs_diff"] > bound or figures["mean_kl"] > max_kl:
            return [f"its logits differ from the model's by up to {figures['max_abs_diff']:.3g} (mean KL "
                    f"{figures['mean_kl']:.3g}), beyond the {quant} bound {bound:.3g} / {max_kl:g}"]
        return []
    bound = KL_BOUNDS.get(quant, DEFAULT_KL_BOUND)
    figures["tolerance"] = {"mean_kl": bound}
    if figures["mean_kl"] > bound:
        return [f"its next-token distributions are a mean KL of {figures['mean_kl']:.3g} nats from the model's "
                f"(top-1 agreement {figures['top1_agreement']:.1%}), beyond the {quant} bound {bound:g}"]
    return []


def check_metadata(file: Path, settings: dict) -> list[str]:
    """The tokenizer keys lorakit wrote are in the file as written."""
    from gguf import GGUFReader

    from lorakit.export.llama_cpp_driver import TOKENIZER_KEYS

    fields = read_fields(GGUFReader(str(file)))
    problems = []
    for name, value in settings.items():
        key = TOKENIZER_KEYS[name][0]
        if value is not None and fields.get(key) != value:
            shown = "missing" if key not in fields else repr(fields.get(key))[:60]
            problems.append(f"its metadata {key} is {shown}, not {repr(value)[:60]}")
    return problems


def read_fields(reader) -> dict[str, Any]:
    """The GGUF's key-value metadata as Python values (token lists left out)."""
    values = {}
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                           "tokenizer.ggml.scores", "GGUF.")):
            continue
        values[key] = field.contents()
    return values


def print_figures(figures: dict) -> None:
    limits = figures.get("tolerance", {})
    bound = (f" (bounds {limits['max_abs_diff']:.3g} / {limits['mean_kl']:g})" if "max_abs_diff" in limits else
             f" (mean KL bound {limits['mean_kl']:g})")
    click.echo(f"  GGUF vs the fine-tuned model on {figures['positions']} positions: max |logit diff| "
               f"{figures['max_abs_diff']:.3g}, mean KL {figures['mean_kl']:.3g}, top-1 agreement "
               f"{figures['top1_agreement']:.1%}{bound}")
    click.echo(f"  greedy replies identical {figures['greedy_replies_identical']}/{figures['conversations']} "
               f"({figures['model_replies_stopped']} of the model's end on a stop token); tokenizer identical on "
               f"{figures['tokenizer_texts_identical']}/{figures['tokenizer_texts']} texts"
               + ("" if figures["passed"] else "  FAILED"))
