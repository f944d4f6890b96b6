"""Writes alignment/assets/demo_pairs.jsonl: small templated preference pairs for the offline demo.

The chosen answer is short and right; the rejected one is the failure the demo should train away:
degenerate repetition or a wrong answer. Deterministic (seeded): rerunning gives the same file.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago",
    "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana", "Ireland": "Dublin", "Austria": "Vienna",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "up": "down", "early": "late", "light": "dark", "fast": "slow", "open": "closed",
    "full": "empty", "wet": "dry", "loud": "quiet", "high": "low", "old": "new", "hard": "soft",
}  # fmt: skip
COLOURS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "chocolate": "brown"}  # fmt: skip


def repeat(phrase: str, times: int) -> str:
    return " ".join([phrase] * times)


def pairs(rng: random.Random):
    for _ in range(100):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        yield (
            f"What is {a} + {b}?",
            f"{a} + {b} = {a + b}.",
            rng.choice([repeat(f"{a} + {b} is", rng.randint(3, 6)), f"{a} + {b} = {wrong}."]),
        )
    for country, city in CAPITALS.items():
        other = rng.choice([c for c in CAPITALS.values() if c != city])
        yield (
            f"What is the capital of {country}?",
            f"The capital of {country} is {city}.",
            rng.choice([repeat(country, rng.randint(4, 8)), f"The capital of {country} is {other}."]),
        )
    for word, opposite in OPPOSITES.items():
        yield (
            f"What is the opposite of '{word}'?",
            f"The opposite of '{word}' is '{opposite}'.",
            repeat(f"'{word}'", rng.randint(4, 8)),
        )
    for thing, colour in COLOURS.items():
        other = rng.choice([c for c in COLOURS.values() if c != colour])
        yield (
            f"What colour is {thing}?",
            f"{thing[0].upper() + thing[1:]} is {colour}.",
            rng.choice([repeat("colour colour", rng.randint(3, 6)), f"{thing[0].upper() + thing[1:]} is {other}."]),
        )
    for _ in range(40):
        n = rng.randint(2, 6)
        yield f"Count to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + ".", repeat("1,", rng.randint(5, 9))


def main() -> None:
    rng = random.Random(0)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs(rng)]
    rng.shuffle(rows)
    out = Path(__file__).resolve().parents[1] / "alignment" / "assets" / "demo_pairs.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} pairs to {out}")


if __name__ == "__main__":
    main()
