#!/usr/bin/env python
"""Write the preference pairs of the quickstart DPO recipe from the quickstart's own task data.

For each conversation of recipes/quickstart/data/{train,test}.jsonl, the pair's prompt is its system and user
messages, `chosen` its correct record and `rejected` a wrong record. With --sft-run (the quickstart's SFT run),
the rejected record is the SFT model's own mistake: of a few replies sampled from it at temperature 0.7, the
first that is not the correct record (kind "sampled"; these are near misses such as `Erik Wagling` for
`Erik Wagner` or `city: Glaspow`, what DPO is for: the model's likely errors made less likely than the right
answer). Rows where every sample is right, and every row without --sft-run, get a made-up record with one field
wrong, the kinds taking turns:

    city       another city of the inventory               city: Porto    -> city: Lisbon
    age        another age, near or not                    age: 64        -> age: 61, age: 23
    surname    another surname                             Ana Oliveira   -> Ana Pereira
    first      another first name, or the surname twice    Ana Oliveira   -> Nina Oliveira, Oliveira Oliveira
    misspelt   a name with one slip (dropped, doubled,     Ana Oliveira   -> Ana Olivera, Anna Oliveira,
               changed letter, cut short or run on)                     Ana Oliv, Ana Oliveiraa

Each row of the output is {"chosen": [system, user, right], "rejected": [system, user, wrong], "kind": ...}
(the shared system and user turns are the prompt). Test pairs come from the quickstart's test split, so no
held-out sentence is ever trained on. Deterministic for a given SFT run and --seed on one machine; the committed
pairs were written, from the repository root, after `lorakit sft recipes/quickstart.yaml`, by:

    python recipes/dpo/make_quickstart_pairs.py --sft-run runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"
sys.path.insert(0, str(QUICKSTART))
from make_data import CITIES, FIRST_NAMES, SURNAMES, answer  # the quickstart's own inventory

# Sampling temperature for the SFT model's own mistakes: low enough for near misses (at 1.0 this small model's
# tail writes garbage no one would confuse with a record), high enough that wrong replies come up at all.
TEMPERATURE = 0.7
KINDS = ("city", "age", "surname", "first", "misspelt")


def parse_record(text: str) -> tuple[str, int, str]:
    fields = dict(line.split(": ", 1) for line in text.splitlines())
    return fields["name"], int(fields["age"]), fields["city"]


def other(choices: list, current, rng: random.Random):
    return rng.choice([choice for choice in choices if choice != current])


def wrong_record(name: str, age: int, city: str, kind: str, rng: random.Random) -> str:
    first, surname = name.split(" ", 1)
    if kind == "city":
        return answer(name, age, other(CITIES, city, rng))
    if kind == "age":
        near = [a for a in range(age - 5, age + 6) if 18 <= a <= 89]
        return answer(name, other(near if rng.random() < 0.5 else list(range(18, 90)), age, rng), city)
    if kind == "surname":
        return answer(f"{first} {other(SURNAMES, surname, rng)}", age, city)
    if kind == "first":
        wrong = surname if rng.random() < 0.3 else other(FIRST_NAMES, first, rng)
        return answer(f"{wrong} {surname}", age, city)
    if rng.random() < 0.5:
        first = misspell(first, rng)
    else:
        surname = misspell(surname, rng)
    return answer(f"{first} {surname}", age, city)


def misspell(word: str, rng: random.Random) -> str:
    """The word with one slip: a letter dropped, doubled or changed, the word cut short or run on. Slips that
    shorten and slips that lengthen come equally often, so the pairs teach copying the name exactly, not a bias
    towards shorter or longer names. The capital is kept, so it still looks like a name."""
    position = rng.randrange(1, len(word))
    slip = rng.choice(("drop", "double", "change", "cut", "run on"))
    if slip == "drop" or (slip == "cut" and len(word) < 5):
        return word[:position] + word[position + 1:]
    if slip == "double":
        return word[:position] + word[position] + word[position:]
    if slip == "change":
        return word[:position] + other(list("aeioulnrst"), word[position], rng) + word[position + 1:]
    if slip == "cut":
        return word[:rng.randrange(3, len(word) - 1)]
    return word + rng.choice(("a", "o", "u", "ly", "er", word[-2:]))


def sample_replies(run: Path, rows: list[dict], samples: int, seed: int, batch_size: int = 64) -> list[list[str]]:
    """`samples` replies of the SFT model in `run` to each row's prompt, sampled at temperature 1 (seeded)."""
    import torch
    from transformers import GenerationConfig

    from lorakit.models.inference import (chat_prompt_ids, load_target_model, load_target_tokenizer, resolve_target,
                                          stop_token_ids)
    from lorakit.models.loading import choose_placement

    target = resolve_target(str(run))
    tokenizer = load_target_tokenizer(target)
    model = load_target_model(target, choose_placement({**target.model_section, "device": "cpu"}))
    stops = stop_token_ids(tokenizer, model)
    config = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                              num_return_sequences=samples, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    replies = []
    for start in range(0, len(rows), batch_size):
        prompts = [chat_prompt_ids(tokenizer, row["messages"][:2]) for row in rows[start:start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:]
        texts = [tokenizer.decode([t for t in row.tolist() if t not in stops and t != tokenizer.pad_token_id],
                                  skip_special_tokens=True).strip() for row in output]
        replies += [texts[i:i + samples] for i in range(0, len(texts), samples)]
        print(f"  sampled {min(start + batch_size, len(rows))}/{len(rows)} prompts", file=sys.stderr)
    return replies


def make_pairs(rows: list[dict], rng: random.Random, sampled: list[list[str]] | None = None) -> list[dict]:
    """One pair per row: the SFT model's own first wrong sample as rejected when it has one, else a made-up error."""
    pairs = []
    for index, row in enumerate(rows):
        system, user, reply = row["messages"]
        mistakes = [text for text in (sampled[index] if sampled else []) if text != reply["content"]]
        if mistakes:
            kind, wrong = "sampled", mistakes[0]
        else:
            kind = KINDS[index % len(KINDS)]
            wrong = wrong_record(*parse_record(reply["content"]), kind, rng)
        pairs.append({"chosen": [system, user, reply],
                      "rejected": [system, user, {"role": "assistant", "content": wrong}], "kind": kind})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=QUICKSTART / "data")
    parser.add_argument("--output-dir", type=Path, default=HERE / "quickstart-pairs")
    parser.add_argument("--sft-run", type=Path, help="the quickstart SFT run whose own mistakes become rejected "
                        "replies (runs/quickstart); without it every rejected reply is made up")
    parser.add_argument("--samples", type=int, default=4, help="replies sampled per prompt with --sft-run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", nargs="+", default=["train", "test"])
    args = parser.parse_args()

    rng = random.Random(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split in args.splits:
        rows = [json.loads(line) for line in (args.data_dir / f"{split}.jsonl").read_text().splitlines() if line]
        sampled = sample_replies(args.sft_run, rows, args.samples, args.seed) if args.sft_run else None
        pairs = make_pairs(rows, rng, sampled)
        path = args.output_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for pair in pairs:
                handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
        own = sum(pair["kind"] == "sampled" for pair in pairs)
        print(f"wrote {len(pairs)} pairs to {path} ({own} with a mistake of the SFT model as rejected)")


if __name__ == "__main__":
    main()
