"""Pairs whose rejected answer loops: the chosen answer's first half, word by word, said four times over.

For checking a judge against answers stuck in a loop (`cli.py evaluate --pairs OUT --judge J`): reads rows
START:STOP of a pairs file (the bundled docstring pairs by default) and writes each row's prompt and chosen answer
with the loop as its rejected answer:

    python scripts/make_loop_pairs.py --rows 500:620 --out /tmp/loop_pairs.jsonl
    python cli.py evaluate --pairs /tmp/loop_pairs.jsonl --judge smollm2-135m-instruct --out /tmp/loop-check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAIRS = Path(__file__).resolve().parents[1] / "alignment" / "assets" / "docstring_pairs.jsonl"


def loop_of(answer: str, times: int = 4) -> str:
    """The answer's first half (at least two words), repeated `times` times."""
    words = answer.split()
    return " ".join(words[: max(2, len(words) // 2)] * times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=str(PAIRS))
    ap.add_argument("--rows", default="500:620", help="START:STOP, as evaluate's --pairs-rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    start, stop = (int(x) for x in args.rows.split(":"))
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()][start:stop]
    lines = [json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": loop_of(r["chosen"])}) for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} pairs with a looping rejected answer -> {args.out}")


if __name__ == "__main__":
    main()
