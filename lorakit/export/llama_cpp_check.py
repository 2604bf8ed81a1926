"""llama.cpp itself on the GGUF, where llama-cpp-python is installed: tokens, prompts, replies and stopping.

transformers reading the GGUF back checks the weights and metadata; this checks what llama.cpp makes of them:
that its tokenizer gives the model's ids (the real proof of the pre-tokenizer), that the chat template taken from
the GGUF's own metadata builds the very prompt training built, and that greedy replies match the fine-tuned
model's and end where its replies end, on llama.cpp's own end-of-generation tokens.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import click


def run_llama_cpp(file: Path, reference, tokenizer, conversations: list[list[dict]]) -> dict:
    if importlib.util.find_spec("llama_cpp") is None:
        return {"ran": False, "reason": "llama-cpp-python is not installed here"}
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lorakit.export.verify import MAX_NEW_TOKENS
    from lorakit.export.vocabulary import check_texts

    click.echo(f"  running {file.name} with llama.cpp (llama-cpp-python {llama_cpp.__version__})")
    context = max(len(s) for s in reference.sequences) + MAX_NEW_TOKENS + 8
    llm = Llama(model_path=str(file), n_ctx=context, n_batch=context, n_threads=os.cpu_count() or 1, seed=0,
                logits_all=True, verbose=False)
    problems = []

    texts = check_texts(tokenizer, conversations)
    split_alike = sum(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                      == tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
    if split_alike < len(texts):
        problems.append(f"llama.cpp tokenizes {len(texts) - split_alike} of {len(texts)} check texts differently "
                        "from the model's tokenizer")

    template = llm.metadata.get("tokenizer.chat_template")
    vocab = llm._model
    bos = vocab.token_get_text(vocab.token_bos()) if vocab.token_bos() != -1 else ""
    eos = vocab.token_get_text(vocab.token_eos()) if vocab.token_eos() != -1 else ""
    same_prompts = 0
    if template:
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        for messages, expected in zip(conversations, reference.prompts):
            prompt = formatter(messages=messages).prompt
            same_prompts += llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == expected
        if same_prompts < len(conversations):
            problems.append(f"the chat template in the GGUF's metadata builds {len(conversations) - same_prompts} "
                            "of the check prompts differently under llama.cpp")
    else:
        problems.append("the GGUF has no tokenizer.chat_template that llama.cpp can read")

    # Greedy replies by teacher forcing, as in lorakit.export.verify: llama.cpp's reply is the model's when its
    # argmax at every reply position is the reply's next token; a reply that ended on a stop token must end on
    # one of llama.cpp's own end-of-generation tokens.
    same_replies = stops_kept = 0
    for prompt, sequence, stopped in zip(reference.prompts, reference.sequences, reference.stopped):
        llm.reset()
        llm.eval(sequence)
        picks = llm.scores[len(prompt) - 1:len(sequence) - 1].argmax(-1).tolist()
        same_replies += picks == sequence[len(prompt):]
        if stopped:
            kept = bool(llama_cpp.llama_vocab_is_eog(vocab.vocab, sequence[-1]))
            stops_kept += kept
            if not kept:
                problems.append(f"the model's replies end on token {sequence[-1]}, which llama.cpp does not treat "
                                "as an end of generation")
    figures = {"ran": True, "version": llama_cpp.__version__, "tokenizer_texts_identical": split_alike,
               "tokenizer_texts": len(texts), "chat_prompts_identical": same_prompts,
               "greedy_replies_identical": same_replies, "stops_at_end_of_turn": stops_kept,
               "model_replies_stopped": sum(reference.stopped),
               "conversations": len(reference.prompts), "problems": problems}
    click.echo(f"  llama.cpp: tokenizer identical on {split_alike}/{len(texts)} texts, chat prompts from the "
               f"GGUF's template identical {same_prompts}/{len(conversations)}, greedy replies identical "
               f"{same_replies}/{len(reference.prompts)}, stops on {stops_kept}/{sum(reference.stopped)} of the model's "
               "end-of-turn tokens"
               + ("" if not problems else "  FAILED"))
    del llm
    return figures
