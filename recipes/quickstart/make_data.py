#!/usr/bin/env python
"""Write the quickstart fine-tuning data: turn a sentence about a person into a record.

Each row is a conversation in the ``messages`` format:

    {"messages": [
      {"role": "system", "content": "Extract the person's name, age and city."},
      {"role": "user", "content": "After retiring at 64, Ana Oliveira moved to Porto."},
      {"role": "assistant", "content": "name: Ana Oliveira\\nage: 64\\ncity: Porto"}]}

The answer has a fixed shape, so a model's reply can be scored by exact string match.
The test split measures generalisation, not memorisation: every test sentence is a
combination of name, age, city and sentence pattern that training never shows, and a
quarter of the test rows use a sentence pattern that never occurs in training at all.
Names and cities come from one inventory for both splits: a 4 M-parameter base model
pretrained for minutes copies words it has seen reliably but spells unseen ones badly
(measured: with names and cities held out of training, 300 LoRA steps gave 0% exact
match, the replies having the right shape and often the right age but misspelt names).

Run from the repository root (deterministic for a given --seed):

    python recipes/quickstart/make_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SYSTEM_PROMPT = "Extract the person's name, age and city."

FIRST_NAMES = """
Aaron Abigail Adam Adele Adrian Agnes Ahmed Aiko Alan Alba Alice Amara Amir Ana Andrea Anika
Anton Arjun Astrid Aurora Beatriz Benjamin Bianca Boris Bruno Camille Carla Carlos Caroline
Chen Chiara Clara Claude Connor Dalia Daniel Daria David Diego Dmitri Edith Elena Elias Eliza
Emil Emma Enzo Erik Esther Ezra Fatima Felix Fiona Frida Gabriel Gemma George Greta Hana
Hannah Harold Hassan Hector Helena Hugo Ibrahim Ida Igor Ines Irene Isaac Ivan Jakob James
Jasmine Javier Jonas Jorge Julia Julian Kaito Karin Keith Kenji Klara Lara Laura Leila Leo
Liam Lina Lorenzo Lucas Lucia Luis Maja Malik Marco Marta Mateo Maya Mei Miguel Mila Nadia
Naomi Nikolai Nina Noah Nora Olga Omar Oscar Pablo Paula Pedro Petra Priya Rafael Rania Rosa
Ruth Samir Sara Sean Simon Sofia Stefan Tariq Tessa Theo Tomas Valentina Victor Vera Wei
Yara Yusuf Zara Zoltan
""".split()

SURNAMES = """
Abbott Adler Alvarez Andersen Araujo Bauer Becker Bianchi Brennan Brooks Castillo Chowdhury
Costa Cruz Dahl Delgado Dubois Duarte Eriksen Esposito Farouk Fischer Fontaine Garcia Gomez
Greene Gruber Haddad Hansen Hartmann Hayes Horvat Ibarra Ishikawa Jansen Jensen Kaplan Keller
Khan Kim Kowalski Kraus Kuznetsov Lambert Larsen Laurent Lindqvist Lopez Lund Mahmoud Marino
Martins Meyer Moreau Morales Moretti Murphy Nakamura Navarro Nielsen Novak Nowak Okafor
Oliveira Ortega Park Pereira Petrov Popescu Quinn Ramos Reyes Ricci Rios Rossi Russo Santos
Sato Schmidt Schneider Silva Sokolov Suzuki Tanaka Torres Varga Vasquez Vogel Wagner Walsh
Weber Yamamoto Yilmaz Young Zhang Ziegler Zimmermann
""".split()

CITIES = """
Amsterdam|Ankara|Athens|Auckland|Austin|Bangkok|Barcelona|Belfast|Berlin|Bilbao|Bogota|Bologna|
Boston|Brisbane|Bristol|Brussels|Budapest|Buenos Aires|Cairo|Calgary|Cape Town|Chicago|Cologne|
Copenhagen|Cork|Delhi|Denver|Dublin|Edinburgh|Florence|Geneva|Glasgow|Granada|Hamburg|Havana|
Helsinki|Hong Kong|Istanbul|Jakarta|Krakow|Kyoto|Lagos|Leeds|Leipzig|Lima|Lisbon|Liverpool|
London|Los Angeles|Lyon|Madrid|Manila|Marseille|Melbourne|Mexico City|Miami|Milan|Montreal|
Mumbai|Munich|Nairobi|Nantes|Naples|New York|Nice|Osaka|Oslo|Ottawa|Oxford|Palermo|Paris|Perth|
Porto|Prague|Quebec|Riga|Rome|Rotterdam|San Diego|Santiago|Seattle|Seoul|Seville|Shanghai|
Singapore|Sofia|Stockholm|Sydney|Tallinn|Tokyo|Toronto|Turin|Utrecht|Valencia|Vancouver|Venice|
Vienna|Vilnius|Warsaw|Wellington|Zagreb|Zurich
""".replace("\n", "").split("|")

# Every value follows a space, so it is spelled with the same tokens in the question and in
# the answer (byte-level BPE tokenizers fold the leading space into the word).
TRAIN_TEMPLATES = [
    "Meet {name}, a {age}-year-old engineer from {city}.",
    "After retiring at {age}, {name} moved to {city}.",
    "The new librarian in {city} is {name}, who is {age}.",
    "Yesterday {name}, aged {age}, ran the marathon in {city}.",
    "Born and raised in {city}, {name} turned {age} last week.",
    "Our guest today is {name}, age {age}, calling from {city}.",
    "Since moving to {city}, {name} has taught piano and is now {age}.",
    "The ticket was booked by {name} (age {age}, home town {city}).",
    "At {age}, {name} opened a small bakery in {city}.",
    "Please welcome {name} from {city}, our youngest speaker at {age}.",
    "A reader from {city}, {name}, {age}, wrote to us about the bridge.",
    "Police in {city} thanked {name}, {age}, for returning the wallet.",
]
HELDOUT_TEMPLATE = "According to the census form, {name} is {age} years old and lives in {city}."


def answer(name: str, age: int, city: str) -> str:
    return f"name: {name}\nage: {age}\ncity: {city}"


def make_rows(n: int, templates: list[str], rng: random.Random, seen: set) -> list[dict]:
    """n rows whose sentences are all new (not in `seen`, which collects them across splits)."""
    rows = []
    while len(rows) < n:
        template = templates[len(rows) % len(templates)]
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
        age = rng.randint(18, 89)
        city = rng.choice(CITIES)
        user = template.format(name=name, age=age, city=city)
        if user in seen:
            continue
        seen.add(user)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer(name, age, city)},
                ]
            }
        )
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=HERE / "data")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    seen: set[str] = set()
    train = make_rows(args.train_rows, TRAIN_TEMPLATES, rng, seen)
    # A quarter of the test rows use the sentence pattern that training never shows.
    test_templates = TRAIN_TEMPLATES + [HELDOUT_TEMPLATE] * (len(TRAIN_TEMPLATES) // 3)
    test = make_rows(args.test_rows, test_templates, rng, seen)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        path = args.output_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
