"""Writes alignment/assets/docstring_pairs.jsonl and docstring_prompts.jsonl: preference pairs from real text.

Each pair asks what a function of Python's standard library does. The chosen answer is the opening of that
function's own docstring; the rejected answer is the opening of the docstring of a function of ANOTHER module,
one of the three nearest in length. Both are fluent, real English in the same register, so a pretrained model
has only a mild preference before training (SmolLM2-135M-Instruct prefers the chosen answer's mean log-prob
in about 2 pairs out of 3): what it must learn is to answer about the function that was asked.
`--same-module` takes the rejected answer from the same module instead (e.g. `heapq.nlargest` for
`heapq.nsmallest`): the base is at chance there, but a short run does not learn to tell them apart either.
Deterministic (seeded); docstrings are those of the Python that runs it (the bundled files: CPython 3.11).

    python scripts/make_real_pairs.py [--check]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "alignment" / "assets"
MODULES = [
    "array", "base64", "binascii", "bisect", "calendar", "cmath", "codecs", "collections", "colorsys", "copy",
    "csv", "datetime", "difflib", "email.utils", "filecmp", "fnmatch", "fractions", "functools", "glob", "gzip",
    "hashlib", "heapq", "html", "http.cookies", "inspect", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "math", "mimetypes", "operator", "os", "os.path", "pathlib", "pickle",
    "pkgutil", "platform", "plistlib", "pprint", "quopri", "random", "re", "secrets", "shlex", "shutil",
    "site", "socket", "statistics", "string", "struct", "subprocess", "sys", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "time", "tokenize", "traceback", "types", "typing", "unicodedata",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "zipfile", "zlib",
]  # fmt: skip
MIN_CHARS, MAX_CHARS = 40, 220  # answers a 135M model can score in a short max_length
PROMPTS_FOR_COMPARE = 8


def opening(doc: str) -> str | None:
    """The docstring's first paragraph, whitespace collapsed, cut after the last sentence that fits; None when
    it is not prose (a signature line, an example, a reference to elsewhere)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if not paragraph or "(" in paragraph.split(" ")[0] or ">>>" in paragraph or "--" in paragraph:
        return None
    sentences = re.split(r"(?<=[.!?])\s+", paragraph)
    text = ""
    for sentence in sentences:
        if len(text) + len(sentence) + 1 > MAX_CHARS:
            break
        text = f"{text} {sentence}".strip()
    if not (MIN_CHARS <= len(text) <= MAX_CHARS) or not text.endswith("."):
        return None
    return text[0].upper() + text[1:]


def documented_functions() -> dict[str, dict[str, str]]:
    """module -> {qualified name: opening of its docstring}, public functions with a prose docstring only."""
    found: dict[str, dict[str, str]] = {}
    seen_texts: set[str] = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(member) or inspect.isbuiltin(member)):
                continue
            text = opening(inspect.getdoc(member) or "")
            if text is None or text in seen_texts:  # aliases (os.path and posixpath) share docstrings
                continue
            seen_texts.add(text)
            found.setdefault(module_name, {})[f"{module_name}.{name}"] = text
    return {module: functions for module, functions in found.items() if len(functions) >= 2}


def pairs(rng: random.Random, same_module: bool = False) -> list[dict[str, str]]:
    """One pair per function: rejected = the docstring of a function nearest in length, of the same module or
    of another one."""
    modules = documented_functions()
    every = {name: text for functions in modules.values() for name, text in functions.items()}
    rows = []
    for functions in modules.values():
        pool = functions if same_module else {n: t for n, t in every.items() if n not in functions}
        for name, text in functions.items():
            others = sorted((abs(len(t) - len(text)), n) for n, t in pool.items() if n != name)
            closest = [n for _, n in others[:3]]
            rows.append({"prompt": f"What does `{name}` do?", "chosen": text, "rejected": pool[rng.choice(closest)]})
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the bundled files differ from a rerun")
    parser.add_argument("--same-module", action="store_true", help="rejected answers from the same module")
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    rows = pairs(random.Random(0), same_module=args.same_module)
    # the prompts for `compare` ask about functions no pair mentions: answers there show what generalised
    held_out, rows = rows[-PROMPTS_FOR_COMPARE:], rows[:-PROMPTS_FOR_COMPARE]
    lines = {
        "docstring_pairs.jsonl": "".join(json.dumps(row) + "\n" for row in rows),
        "docstring_prompts.jsonl": "".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in held_out),
    }
    for name, text in lines.items():
        path = args.out / name
        if args.check:
            if path.read_text() != text:
                sys.exit(f"{path} differs from what {Path(__file__).name} writes")
            continue
        path.write_text(text)
        print(f"{path}: {text.count(chr(10))} rows")


if __name__ == "__main__":
    main()
