"""`python cli.py evaluate`: did alignment work? Pairwise win-rates of the base and its adapters judged by a local
model, held-out preference accuracy on a pairs file, the judge's own agreement with that file's labels, and the
answers' repetition and length, in one table.

Everything lands in `evaluate.jsonl`, one record per fact (an answer, a pair's log-probs, one order of one
judgement), and every figure of `evaluate.md` is computed from those records (`summarize`). Answers are cached per
(model, prompt, decoding settings) under the cache directory, so that another judge regenerates nothing; records
already in the output directory (or in its progress file, which a stopped evaluation leaves) are not redone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Iterable
from contextlib import nullcontext
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from alignment.commands.compare import (
    BASE,
    Policy,
    Prompt,
    _answers,
    load_models,
    policy_setup,
    prompt_token_ids,
    read_prompts,
    use_model,
)
from alignment.commands.evaluate_tables import summarize, write_evaluation
from alignment.commands.judge import MODES, Judge, judge_all, load_judge
from alignment.data.batches import TokenizedPair, collate_pairs, truncate_pair
from alignment.data.encoding import tokenize_rows
from alignment.data.rows import PreferenceRow, load_rows
from alignment.errors import ConfigError
from alignment.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_write, cache_dir
from alignment.logprobs import sequence_logps
from alignment.model.generate import DecodeOptions, generate_ids, stop_token_ids
from alignment.run.rundir import run_of_adapter

log = logging.getLogger(__name__)

RESULTS, PROGRESS = "evaluate.jsonl", ".evaluate.progress.jsonl"
Record = dict[str, Any]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Ledger:
    """The records of an evaluation, by key: those found in --out (a finished or a stopped evaluation) are reused,
    new ones are appended to the progress file as they come, so that a stopped evaluation continues there."""

    def __init__(self, target: Path):
        self.target = target
        self.found: dict[str, Record] = {}
        for name in (RESULTS, PROGRESS):
            for record in _read_jsonl(target / name):
                if "key" in record:
                    self.found[record["key"]] = record
        self.records: list[Record] = []

    def get(self, key: str) -> Record | None:
        return self.found.get(key)

    def note(self, records: list[Record]) -> None:
        """New records, appended to the progress file at once (a stopped evaluation keeps them)."""
        self.target.mkdir(parents=True, exist_ok=True)
        with open(self.target / PROGRESS, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.found.update((r["key"], r) for r in records)

    def keep(self, records: Iterable[Record]) -> None:
        """Records of this evaluation, in the order evaluate.jsonl will hold them."""
        self.records += records

    def finish(self, settings: Record) -> list[Record]:
        """Write evaluate.jsonl (this evaluation's records only) in one rename, then drop the progress file."""
        records = [settings, *self.records]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        atomic_write(self.target / RESULTS, lambda f: f.write(text))
        (self.target / PROGRESS).unlink(missing_ok=True)
        return records


def _read_jsonl(path: Path) -> list[Record]:
    """The whole lines of a JSONL file; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ---- the models: answers and log-probs ---------------------------------------------------------------------------


def model_identity(policy: Policy, name: str) -> str:
    """What makes a model's answers: the base and its loading, and for an adapter the bytes of its files."""
    parts: list[Any] = [policy.base, policy.revision, policy.in_4bit, policy.use_chat]
    path = dict(policy.adapters).get(name)
    if path is not None:
        for file in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
            if (path / file).is_file():
                parts.append(hashlib.sha256((path / file).read_bytes()).hexdigest())
    return _digest(*parts)


def generate_cached(model, policy: Policy, ids: list[list[int]], *, decode: DecodeOptions, batch_size: int,
                    seed: int) -> dict[str, list[list[int]]]:  # fmt: skip
    """Each model's answer ids to each prompt, generated in batches or read from the cache
    ($ALIGNMENT_CACHE/generations/<model and settings>.jsonl, one line per answer, appended per batch)."""
    folder = cache_dir() / "generations"
    folder.mkdir(parents=True, exist_ok=True)
    stops = stop_token_ids(model, policy.tokenizer)
    settings = dict(pad_id=policy.tokenizer.pad_token_id, stop_ids=stops, decode=decode)
    names = [BASE, *policy.adapter_names]
    keys = [_digest(p) for p in ids]
    files = {n: folder / f"{_digest(model_identity(policy, n), decode.applied(), decode.do_sample and seed)}.jsonl"
             for n in names}  # fmt: skip
    cached = {n: {r["prompt"]: r["ids"] for r in _read_jsonl(files[n]) if "prompt" in r} for n in names}
    todo = {n: [i for i, k in enumerate(keys) if k not in cached[n]] for n in names}
    batches = sum(-(-len(t) // batch_size) for t in todo.values())
    with tqdm(total=batches, desc="generating", unit="batch") as progress:
        for name in names:
            progress.set_postfix(model=name)
            torch.manual_seed(seed)
            with use_model(model, name):
                for start in range(0, len(todo[name]), batch_size):
                    chunk = todo[name][start : start + batch_size]
                    new = generate_ids(model, [ids[i] for i in chunk], batch_size=batch_size, **settings)
                    lines = [{"prompt": keys[i], "ids": a} for i, a in zip(chunk, new, strict=True)]
                    with open(files[name], "a", encoding="utf-8") as f:
                        f.writelines(json.dumps(line) + "\n" for line in lines)
                    cached[name].update((line["prompt"], line["ids"]) for line in lines)
                    progress.update(1)
    return {n: [cached[n][k] for k in keys] for n in names}


@torch.no_grad()
def pair_logps(model, pairs: list[TokenizedPair], *, pad_id: int, batch_size: int,
               progress: tqdm | None = None) -> list[tuple[float, ...]]:  # fmt: skip
    """(chosen sum, rejected sum, chosen mean, rejected mean) log-probs of each pair's answers under `model`."""
    device = next(model.parameters()).device
    out: list[tuple[float, ...]] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start : start + batch_size], pad_id=pad_id)
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        labels = batch.labels.to(device)[:, 1:]  # (2b, T-1), aligned with logits[:, :-1]
        sums = sequence_logps(logits[:, :-1].float(), labels).tolist()
        means = sequence_logps(logits[:, :-1].float(), labels, average=True).tolist()
        half = len(sums) // 2
        out += [(sums[i], sums[half + i], means[i], means[half + i]) for i in range(half)]
        if progress is not None:
            progress.update(half)
    return out


def _tokenized_pairs(policy: Policy, rows: list[PreferenceRow], max_length: int) -> list[TokenizedPair]:
    encoded = tokenize_rows(rows, policy.tokenizer, policy.use_chat)
    pairs = [truncate_pair(e.prompt_ids, e.chosen_ids, e.rejected_ids, i, max_length=max_length, head=e.head,
                           template=e.template) for i, e in enumerate(encoded)]  # fmt: skip
    if any(p is None for p in pairs):
        raise ConfigError(f"--max-length {max_length}: a prompt of --pairs leaves no room for its answers")
    return pairs  # type: ignore[return-value]


def dpo_adapters(policy: Policy) -> list[str]:
    """The adapters trained by DPO from the bare base: their implicit reward is against the base."""
    names = []
    for name, path in policy.adapters:
        run = run_of_adapter(path)
        model = (run.config().get("model") or {}) if run else {}
        if str(model.get("class_path", "")).endswith("DPO") and not run.model_args().get("adapter"):
            names.append(name)
    return names


def evaluate_models(policy: Policy, ledger: Ledger, prompts: list[tuple[Prompt, str | None]],
                    pairs: list[PreferenceRow], *, decode: DecodeOptions, batch_size: int, ngram: int, seed: int,
                    max_length: int) -> dict[str, list[str]]:  # fmt: skip
    """Answer records and pair log-prob records of every model; returns the answers' texts per model."""
    names = [BASE, *policy.adapter_names]
    tokenized = _tokenized_pairs(policy, pairs, max_length) if pairs else []
    pair_keys = {n: [_digest(model_identity(policy, n), p) for p in tokenized] for n in names}
    missing = any(ledger.get(k) is None for keys in pair_keys.values() for k in keys)
    model = load_models(policy.base, policy.revision, policy.in_4bit, policy.adapters) if prompts or missing else None
    texts: dict[str, list[str]] = {}
    if prompts:
        ids = prompt_token_ids(policy.tokenizer, prompts, policy.use_chat)
        generated = generate_cached(model, policy, ids, decode=decode, batch_size=batch_size, seed=seed)
        for name, found in generated.items():
            answers = _answers(policy.tokenizer, found, ngram)
            texts[name] = [a.text for a in answers]
            ledger.keep([{"kind": "answer", "model": name, "prompt": i, "text": a.text, "tokens": a.tokens,
                          "repetition": a.repetition} for i, a in enumerate(answers)])  # fmt: skip
    fields = ("chosen", "rejected", "chosen_mean", "rejected_mean")
    with tqdm(total=sum(ledger.get(k) is None for ks in pair_keys.values() for k in ks), desc="scoring pairs",
              unit="pair", disable=not missing) as progress:  # fmt: skip
        for name in names:
            todo = [i for i, k in enumerate(pair_keys[name]) if ledger.get(k) is None]
            with use_model(model, name) if todo else nullcontext():
                found = pair_logps(model, [tokenized[i] for i in todo], pad_id=policy.tokenizer.pad_token_id,
                                   batch_size=max(1, batch_size // 2), progress=progress)  # fmt: skip
            fresh = {i: dict(zip(fields, values, strict=True)) for i, values in zip(todo, found, strict=True)}
            ledger.note([{"kind": "logps", "key": pair_keys[name][i], **values} for i, values in fresh.items()])
            kept = (
                {"kind": "logps", "key": key, "model": name, "pair": i, **{f: ledger.get(key)[f] for f in fields}}
                for i, key in enumerate(pair_keys[name])
            )
            ledger.keep(kept)
    del model
    gc.collect()
    return texts


# ---- the judge ---------------------------------------------------------------------------------------------------

Job = tuple[
    Record, tuple[str, ...]
]  # (the record without its figures, (question, first, second) or (question, answer))
FIGURES = {"pairwise": ("p_first", "p_second"), "likelihood": ("logp", "logp_null", "tokens")}


def _text(part: str | list[dict[str, str]]) -> str:
    """A prompt or an answer as the judge reads it: the text, or chat messages one per line (role: content)."""
    if isinstance(part, str):
        return part
    if len(part) == 1:
        return part[0]["content"]
    return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in part)


def answer_jobs(judge: Judge, prompts: list[tuple[Prompt, str | None]], texts: dict[str, list[str]]) -> list[Job]:
    """Pairwise: each prompt, each pair of models, both orders. Likelihood: each prompt, each model's answer."""
    jobs: list[Job] = []
    for i, (prompt, _) in enumerate(prompts):
        question = _text(prompt)
        if judge.mode == "likelihood":
            for name, answers in texts.items():
                shown = (question, answers[i])
                jobs.append(({"kind": "score", "key": _digest(judge.identity, *shown), "judge": judge.name,
                              "prompt": i, "model": name}, shown))  # fmt: skip
            continue
        for x, y in combinations(texts, 2):
            for first, second in ((x, y), (y, x)):
                shown = (question, texts[first][i], texts[second][i])
                record = {"kind": "judgement", "key": _digest(judge.identity, *shown), "judge": judge.name,
                          "prompt": i, "first": first, "second": second}  # fmt: skip
                jobs.append((record, shown))
    return jobs


def label_jobs(judge: Judge, pairs: list[PreferenceRow]) -> list[Job]:
    """Pairwise: each pair of the file, its chosen answer shown first, then its rejected one. Likelihood: each pair's
    chosen answer, then its rejected one."""
    jobs: list[Job] = []
    for i, row in enumerate(pairs):
        answers = {"chosen": _text(row.chosen), "rejected": _text(row.rejected)}
        if judge.mode == "likelihood":
            for answer, text in answers.items():
                shown = (_text(row.prompt or ""), text)
                jobs.append(({"kind": "label_score", "key": _digest(judge.identity, *shown), "judge": judge.name,
                              "pair": i, "answer": answer}, shown))  # fmt: skip
            continue
        for first, second in (("chosen", "rejected"), ("rejected", "chosen")):
            shown = (_text(row.prompt or ""), answers[first], answers[second])
            record = {"kind": "label", "key": _digest(judge.identity, *shown), "judge": judge.name, "pair": i,
                      "first": first, "second": second}  # fmt: skip
            jobs.append((record, shown))
    return jobs


def run_jobs(judge: Judge, ledger: Ledger, jobs: list[Job], *, batch_size: int, desc: str) -> None:
    """Judge what the ledger does not hold yet (noting each batch as it is done), then keep every job's record."""
    todo = [(record, shown) for record, shown in jobs if ledger.get(record["key"]) is None]
    fields = FIGURES[judge.mode]

    def done(indices: list[int], figures: list[tuple]) -> None:
        found = zip(indices, figures, strict=True)
        ledger.note([{**todo[i][0], **dict(zip(fields, values, strict=True))} for i, values in found])

    if todo:
        render = judge.render if judge.mode == "pairwise" else judge.render_answer
        items = [render(*shown) for _, shown in todo]
        judge_all(judge, items, batch_size=batch_size, desc=desc, on_batch=done)  # type: ignore[arg-type]
    ledger.keep({**record, **{f: found[f] for f in fields}}
                for record, _ in jobs if (found := ledger.get(record["key"])))  # fmt: skip


# ---- the command -------------------------------------------------------------------------------------------------


def run_evaluate(
    *,
    prompts: str | Path | None = None,
    pairs: str | Path | None = None,
    pairs_rows: slice = slice(None),
    adapters: list[str] | None = None,
    base: str | None = None,
    revision: str | None = None,
    load_in_4bit: bool | None = None,
    decode: DecodeOptions | None = None,
    chat_template: Literal["auto", "on", "off"] = "auto",
    prompt_field: str = "prompt",
    judge: str | None = None,
    judge_revision: str | None = None,
    judge_template: str | Path | None = None,
    judge_in_4bit: bool = False,
    judge_mode: str = MODES[0],
    tie_margin: float = 0.05,
    max_length: int = 512,
    batch_size: int = 8,
    ngram: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
) -> Path:
    """Answers, log-probs and judgements into evaluate.jsonl, the tables into evaluate.md; returns the directory."""
    decode = decode or DecodeOptions()
    adapters = adapters or []
    _check(prompts, pairs, adapters, base, judge, tie_margin, batch_size, ngram, max_length)
    if judge_mode not in MODES:
        raise ConfigError(f"--judge-mode must be one of {', '.join(MODES)}, got {judge_mode!r}")
    if judge_mode == "likelihood" and judge_template is not None:
        raise ConfigError("--judge-template: the likelihood judge reads no template; use it with --judge-mode pairwise")
    prompt_rows = read_prompts(prompts, prompt_field) if prompts else []
    pair_rows = load_rows(str(pairs))[pairs_rows] if pairs else []
    if pairs and not pair_rows:
        raise ConfigError(f"--pairs-rows: no row of {pairs} in {pairs_rows.start}:{pairs_rows.stop}")
    policy = policy_setup(adapters, base, revision, load_in_4bit, chat_template) if adapters or base else None
    target = Path(out) if out is not None else (policy.home if policy else Path.cwd()) / "evaluate"
    ledger = Ledger(target)
    settings: Record = {"kind": "settings", "tie_margin": tie_margin, "prompts": str(prompts) if prompts else None,
                        "pairs": str(pairs) if pairs else None, "judge": judge,
                        "judge_mode": judge_mode if judge else None,
                        "judge_template": str(judge_template or "default") if judge_mode == "pairwise" else None,
                        "models": [],
                        "dpo_adapters": []}  # fmt: skip
    texts: dict[str, list[str]] = {}
    if policy is not None:
        texts = evaluate_models(policy, ledger, prompt_rows, pair_rows, decode=decode, batch_size=batch_size,
                                ngram=ngram, seed=seed, max_length=max_length)  # fmt: skip
        settings.update(models=[BASE, *policy.adapter_names], dpo_adapters=dpo_adapters(policy),
                        **policy.settings(), **decode.applied())  # fmt: skip
    if judge is not None:
        loaded = load_judge(judge, judge_template, revision=judge_revision, in_4bit=judge_in_4bit, mode=judge_mode)
        if pair_rows:
            run_jobs(loaded, ledger, label_jobs(loaded, pair_rows), batch_size=batch_size, desc="judging labels")
        if prompt_rows:
            jobs = answer_jobs(loaded, prompt_rows, texts)
            run_jobs(loaded, ledger, jobs, batch_size=batch_size, desc="judging answers")
    records = ledger.finish(settings)
    summary = summarize(records)
    write_evaluation(target, summary, prompt_rows)
    print(summary.text())
    return target


def _check(prompts, pairs, adapters, base, judge, tie_margin, batch_size, ngram, max_length) -> None:
    """The mistakes that need nothing loaded to be seen, each a one-line ConfigError naming its flag."""
    if prompts is None and pairs is None:
        raise ConfigError("--prompts (win-rates between models) or --pairs (accuracy on labelled pairs) is needed")
    if prompts is not None and not adapters:
        raise ConfigError("--prompts: win-rates need two or more models: the base and at least one --adapter")
    if prompts is not None and judge is None:
        raise ConfigError("--prompts: win-rates need a --judge (a hub name, a directory, a .gguf file)")
    if pairs is not None and judge is None and not adapters and base is None:
        raise ConfigError("--pairs: name a --judge to check, or --adapter / --base models to score")
    if not 0 <= tie_margin < 0.5:
        raise ConfigError(f"--tie-margin must be within [0, 0.5), got {tie_margin}")
    if batch_size < 1 or ngram < 1 or max_length < 2:
        raise ConfigError(f"--batch-size and --ngram must be >= 1 and --max-length >= 2, got {batch_size}, {ngram}, "
                          f"{max_length}")  # fmt: skip
