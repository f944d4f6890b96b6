"""`python cli.py compare`: answers of the base and of each adapter to the same prompts, side by side.

One base in memory; the adapters are loaded onto it under their names and switched between, and the base's
own answers come with the adapters disabled.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.commands.tables import BASE, html_table, markdown_table, visible
from alignment.data.encoding import prompt_ids
from alignment.data.rows import PreferenceRow, _read_records
from alignment.errors import ConfigError, DataError
from alignment.model.generate import DecodeOptions, generate_ids, stop_token_ids
from alignment.run.rundir import adapter_dir, base_of, run_of_adapter

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # generated tokens, end-of-sequence excluded
    repetition: float  # repetition_score of the generated token ids


def repetition_score(tokens: Sequence[Hashable], n: int = 4) -> float:
    """Share of the sequence's n-grams that repeat an n-gram seen earlier in the same sequence.

    With k = len(tokens) - n + 1 n-grams (overlapping, in order), the score is (k - distinct n-grams) / k:
    0 when no n-gram comes back, close to 1 for an answer stuck in a loop ("a b a b a b ..." with n = 2 gives
    (k - 2) / k). Sequences shorter than n score 0. Computed on token ids, so it needs no word boundaries
    (it works for languages written without spaces) and is comparable between models sharing a tokenizer.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


# ---- input -------------------------------------------------------------------------------------------------------


def read_prompts(path: str | Path, field: str = "prompt") -> list[tuple[Prompt, str | None]]:
    """(prompt, system) per row of a text file (one prompt per line) or of anything `fit` reads pairs from
    (JSONL, JSON list of objects, Parquet, CSV), whose rows hold the prompt in `field`, a string or chat
    messages, and optionally a `system` string. A preference-pairs file serves as it is.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"prompts file {file} does not exist")
    if file.suffix == ".txt":
        text = file.read_text(encoding="utf-8")
        prompts: list[tuple[Prompt, str | None]] = [(line, None) for line in text.splitlines() if line.strip()]
    else:  # the pairs' readers: the same formats, and errors naming the file and the line or row
        _, records = _read_records(str(file), "train", None)
        prompts = [_prompt_of(record, source, field) for source, record in records]
    if not prompts:
        raise DataError(f"{file} holds no prompt")
    return prompts


def _prompt_of(record: dict[str, Any], source: str, field: str) -> tuple[Prompt, str | None]:
    if field not in record:
        keys = sorted(record)
        raise DataError(f"{source}: no {field!r} field (found {keys}); name the field with --prompt-field")
    prompt, system = record[field], record.get("system")
    messages = isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)
    if not (isinstance(prompt, str) and prompt.strip()) and not (messages and prompt):
        raise DataError(f"{source}: field {field!r} must be a non-empty string or a list of chat messages")
    return prompt, system if isinstance(system, str) else None


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=RUN` (or a bare RUN, named after its directory) → (name, adapter directory)."""
    adapters: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name == BASE:
            raise ConfigError(f"--adapter {spec}: the name must be letters, digits, '-' or '_', and not {BASE!r}")
        if name in (n for n, _ in adapters):
            raise ConfigError(f"--adapter {spec}: the name {name!r} is used twice")
        adapters.append((name, adapter_dir(path)))
    return adapters


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[tuple[Prompt, str | None]], use_chat_template: bool
) -> list[list[int]]:
    """The prompts' token ids exactly as training renders a prompt (chat template, BOS, system turn)."""
    rows = [
        PreferenceRow(prompt, "x", "x", system, source=f"prompt {i}") for i, (prompt, system) in enumerate(prompts, 1)
    ]
    return prompt_ids(rows, tokenizer, use_chat_template)


def _answers(tokenizer: PreTrainedTokenizerBase, generated: list[list[int]], ngram: int) -> list[Answer]:
    return [
        Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), repetition_score(ids, ngram))
        for ids in generated
    ]


def generate_all(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    adapters: list[str],
    *,
    decode: DecodeOptions,
    batch_size: int,
    ngram: int,
    seed: int,
) -> dict[str, list[Answer]]:
    """Answers per model name: the base (adapters disabled), then each adapter in turn on the same base."""
    batches = -(-len(prompts) // batch_size)
    stops = stop_token_ids(model, tokenizer)
    generate = dict(pad_id=tokenizer.pad_token_id, stop_ids=stops, decode=decode, batch_size=batch_size)
    results: dict[str, list[Answer]] = {}
    with tqdm(total=batches * (1 + len(adapters)), desc="generating", unit="batch") as progress:
        for name in [BASE, *adapters]:
            progress.set_postfix(model=name)
            torch.manual_seed(seed)  # each model samples from the same seed, whatever its place in the order
            with use_model(model, name):
                ids = generate_ids(model, prompts, progress=progress, **generate)
            results[name] = _answers(tokenizer, ids, ngram)
    return results


@contextmanager
def use_model(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Switch the base (loaded by `load_models`) to the adapter `name`, or to the bare base for BASE."""
    from peft import PeftModel

    if name == BASE and isinstance(model, PeftModel):  # the base is the adapters disabled
        with model.disable_adapter():
            yield
        return
    if name != BASE:
        model.set_adapter(name)
    yield


def load_models(
    base: str, revision: str | None, load_in_4bit: bool, adapters: list[tuple[str, Path]]
) -> PreTrainedModel:
    """One copy of the base, with every adapter loaded onto it under its name (a PeftModel when there are any)."""
    from peft import PeftModel

    from alignment.model.load import load_base

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as training's compute_dtype "auto"
    model = load_base(base, revision=revision, load_in_4bit=load_in_4bit, compute_dtype=dtype, device=device)
    for i, (name, path) in enumerate(adapters):
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as err:  # shapes or module names of another base
            raise ConfigError(f"the adapter {path} does not fit the base {base!r}: {err}") from err
    return model.eval()


def _use_chat_template(choice: Literal["auto", "on", "off"], tokenizer: PreTrainedTokenizerBase, trained: dict) -> bool:
    if choice == "on" and not tokenizer.chat_template:
        raise ConfigError("--chat-template on, but the base's tokenizer has no chat template")
    if choice != "auto":
        return choice == "on"
    if trained.get("use_chat_template") is not None:  # as the adapter was trained
        return bool(trained["use_chat_template"])
    return bool(tokenizer.chat_template)


def _check_bases(adapters: list[tuple[str, Path]], base: str) -> None:
    for name, path in adapters:
        run = run_of_adapter(path)
        trained = run.model_args().get("base") if run else None
        if trained is not None and trained != base:
            log.warning("adapter %s was trained on %r, not on %r: its answers may mean little", name, trained, base)


def run_compare(
    *,
    prompts: str | Path,
    adapters: list[str],
    base: str | None = None,
    revision: str | None = None,
    load_in_4bit: bool | None = None,
    decode: DecodeOptions | None = None,
    chat_template: Literal["auto", "on", "off"] = "auto",
    prompt_field: str = "prompt",
    batch_size: int = 8,
    ngram: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
) -> Path:
    """Generate, then write compare.md, compare.html and compare.jsonl; returns the output directory.

    Unset settings come from the first adapter's run (its config.yaml): base, revision, 4-bit, chat template.
    """
    decode = decode or DecodeOptions()
    if batch_size < 1 or ngram < 1:
        raise ConfigError(f"--batch-size and --ngram must be >= 1, got {batch_size} and {ngram}")
    rows = read_prompts(prompts, prompt_field)
    policy = policy_setup(adapters, base, revision, load_in_4bit, chat_template)
    ids = prompt_token_ids(policy.tokenizer, rows, policy.use_chat)
    model = load_models(policy.base, policy.revision, policy.in_4bit, policy.adapters)
    answers = generate_all(model, policy.tokenizer, ids, policy.adapter_names, decode=decode, batch_size=batch_size,
                           ngram=ngram, seed=seed)  # fmt: skip
    target = Path(out) if out is not None else policy.home / "compare"
    write_comparison(target, rows, answers, {**policy.settings(), "repetition n-gram": ngram, **decode.applied()})
    return target


@dataclass(frozen=True)
class Policy:
    """The base and its adapters as `compare` and `evaluate` take them, with the settings they were trained with."""

    base: str
    revision: str | None
    in_4bit: bool
    use_chat: bool
    adapters: list[tuple[str, Path]]
    tokenizer: PreTrainedTokenizerBase
    home: Path  # where the outputs go by default: beside the first adapter's run, else the working directory

    @property
    def adapter_names(self) -> list[str]:
        return [name for name, _ in self.adapters]

    def settings(self) -> dict[str, Any]:
        return {"base": self.base, "4-bit": self.in_4bit, "chat template": self.use_chat,
                **{f"adapter {n}": str(p) for n, p in self.adapters}}  # fmt: skip


def policy_setup(
    adapters: list[str],
    base: str | None,
    revision: str | None,
    load_in_4bit: bool | None,
    chat_template: Literal["auto", "on", "off"],
) -> Policy:
    """Unset settings come from the first adapter's run (its config.yaml): base, revision, 4-bit, chat template."""
    from alignment.hub.tokenizer import load_tokenizer

    named = parse_adapters(adapters)
    run = run_of_adapter(named[0][1]) if named else None
    if named:
        base, revision, trained = base_of(named[0][1], base, revision)
    elif base is None:
        raise ConfigError("--base is needed when no --adapter is given")
    else:
        trained = {}
    _check_bases(named, base)
    tokenizer = load_tokenizer(base, revision)
    use_chat = _use_chat_template(chat_template, tokenizer, (run.config().get("data") or {}) if run else {})
    in_4bit = load_in_4bit if load_in_4bit is not None else bool(trained.get("load_in_4bit", True))
    home = run.path.parent if run else Path.cwd()
    return Policy(base, revision, in_4bit, use_chat, named, tokenizer, home)


# ---- output ------------------------------------------------------------------------------------------------------


def _show_prompt(prompt: Prompt, system: str | None, show: Callable[[str], str]) -> str:
    if isinstance(prompt, str):
        text = show(prompt)
    else:
        text = "\n".join(f"{m.get('role', '?')}: {show(m['content'])}" for m in prompt)
    return f"system: {show(system)}\n{text}" if system else text


def comparison_rows(
    prompts: list[tuple[Prompt, str | None]], answers: dict[str, list[Answer]], show: Callable[[str], str] = str
) -> list[list[str | int]]:
    """One row per prompt (#, prompt, one answer per model), then one row of averages per model.

    `show` renders the prompts' and answers' own text (`visible` for markdown); the line breaks between a cell's
    parts stay line breaks."""
    rows: list[list[str | int]] = []
    for i, (prompt, system) in enumerate(prompts):
        cells = [f"{show(a[i].text)}\n\n(repetition {a[i].repetition:.2f}, {a[i].tokens} tokens)"
                 for a in answers.values()]  # fmt: skip
        rows.append([i + 1, _show_prompt(prompt, system, show), *cells])
    means = [
        f"repetition {sum(a.repetition for a in found) / len(found):.3f}, "
        f"{sum(a.tokens for a in found) / len(found):.1f} tokens"
        for found in answers.values()
    ]
    rows.append(["", "mean", *means])
    return rows


def write_comparison(
    target: Path, prompts: list[tuple[Prompt, str | None]], answers: dict[str, list[Answer]], settings: dict
) -> None:
    target.mkdir(parents=True, exist_ok=True)
    header = ["#", "prompt", *answers]
    about = "\n".join(f"- {key}: {value}" for key, value in settings.items())
    note = ("Repetition: share of the answer's token n-grams that repeat an earlier one (0: none, near 1: a loop). "
            "Tokens: generated tokens before the end of sequence.")  # fmt: skip
    (target / "compare.md").write_text(
        f"# Answers side by side\n\n{about}\n\n{note}\n\n"
        + markdown_table(header, comparison_rows(prompts, answers, visible))
    )
    page = html_table(header, comparison_rows(prompts, answers), title="Answers side by side", footer=1)
    (target / "compare.html").write_text(page)
    with open(target / "compare.jsonl", "w", encoding="utf-8") as f:
        for i, (prompt, system) in enumerate(prompts):
            record = {"prompt": prompt, "system": system, "answers": {m: asdict(a[i]) for m, a in answers.items()}}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.info("comparison of %d prompts x %d models written to %s", len(prompts), len(answers), target)
