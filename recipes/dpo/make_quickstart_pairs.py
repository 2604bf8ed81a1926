#!/usr/bin/env python
"""Write the preference pairs of the quickstart DPO recipe from the quickstart's own task data.

For each conversation of recipes/quickstart/data/{train,test}.jsonl, the pair's prompt is its system and user
messages, `chosen` its correct record and `rejected` a plausible wrong record: the same shape with one field
wrong, in the ways a small model gets this task wrong. The kinds take turns, row by row:

    city       another city of the inventory               city: Porto    -> city: Lisbon
    age        another age, near or not                    age: 64        -> age: 61, age: 23
    surname    another surname                             Ana Oliveira   -> Ana Pereira
    first      another first name, or the surname twice    Ana Oliveira   -> Nina Oliveira, Oliveira Oliveira
    misspelt   a name with one slip (dropped, doubled,     Ana Oliveira   -> Ana Olivera, Anna Oliveira,
               changed letter, cut short or run on)                     Ana Oliv, Ana Oliveiraa

(The quickstart's SFT model, at 97% exact match on the test split, gets its last rows wrong in just these ways:
misspelt, shortened or run-on names, the surname written twice, a wrong age.)

Each row of the output is {"chosen": [system, user, right], "rejected": [system, user, wrong], "kind": ...}
(the shared system and user turns are the prompt). Test pairs come from the quickstart's test split, so no
held-out sentence is ever trained on. Deterministic for a given --seed; run from the repository root:

    python recipes/dpo/make_quickstart_pairs.py
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


def make_pairs(rows: list[dict], rng: random.Random) -> list[dict]:
    pairs = []
    for index, row in enumerate(rows):
        system, user, reply = row["messages"]
        kind = KINDS[index % len(KINDS)]
        wrong = wrong_record(*parse_record(reply["content"]), kind, rng)
        pairs.append({"chosen": [system, user, reply],
                      "rejected": [system, user, {"role": "assistant", "content": wrong}], "kind": kind})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=QUICKSTART / "data")
    parser.add_argument("--output-dir", type=Path, default=HERE / "quickstart-pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (args.data_dir / f"{split}.jsonl").read_text().splitlines() if line]
        path = args.output_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for pair in make_pairs(rows, rng):
                handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
