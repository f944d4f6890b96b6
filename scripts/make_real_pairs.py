"""Writes alignment/assets/docstring_pairs.jsonl and docstring_prompts.jsonl: preference pairs from real text.

Each pair asks what a function of Python's standard library does. The chosen answer is the opening of that
function's own docstring; the rejected answer is the opening of the docstring of ANOTHER function of the same
module, of about the same length. Both are fluent, real English in the same register and on the same topic
(the module's), so a pretrained model has little reason to prefer either before training: what it must learn
is to answer about the function that was asked. Deterministic (seeded); docstrings are those of the Python
that runs it (the bundled files come from CPython 3.11).

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


def pairs(rng: random.Random) -> list[dict[str, str]]:
    """One pair per function: rejected = the docstring of the function of the same module nearest in length."""
    rows = []
    for functions in documented_functions().values():
        for name, text in functions.items():
            others = sorted((abs(len(t) - len(text)), n) for n, t in functions.items() if n != name)
            closest = [n for d, n in others if d == others[0][0]]
            rejected = functions[rng.choice(closest)]
            rows.append({"prompt": f"What does `{name}` do?", "chosen": text, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the bundled files differ from a rerun")
    args = parser.parse_args()
    rows = pairs(random.Random(0))
    # the prompts for `compare` ask about functions no pair mentions: answers there show what generalised
    held_out, rows = rows[-PROMPTS_FOR_COMPARE:], rows[:-PROMPTS_FOR_COMPARE]
    lines = {
        "docstring_pairs.jsonl": "".join(json.dumps(row) + "\n" for row in rows),
        "docstring_prompts.jsonl": "".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in held_out),
    }
    for name, text in lines.items():
        path = ASSETS / name
        if args.check:
            if path.read_text() != text:
                sys.exit(f"{path} differs from what {Path(__file__).name} writes")
            continue
        path.write_text(text)
        print(f"{path}: {text.count(chr(10))} rows")


if __name__ == "__main__":
    main()
