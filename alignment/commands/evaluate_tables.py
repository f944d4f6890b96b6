"""The figures of `evaluate`, computed from the records of `evaluate.jsonl` alone: the win/tie/loss matrix, the
line per pair of models, the judge's agreement with the labels, and the table per model. `evaluate_summary` gives
a finished evaluation's row per model (what a sweep tabulates)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.commands.tables import markdown_table
from alignment.files import atomic_write
from alignment.judging import Tally, accuracy, percent, pmi, score_verdict, tally, verdict

Record = dict[str, Any]
LIKELIHOOD = ("Likelihood judge: each answer scored alone, s = (log p(answer | question) - log p(answer | empty "
              "message)) / tokens under the judge; x is preferred with probability sigmoid(s_x - s_y); nothing is "
              "shown in an order.")  # fmt: skip


@dataclass
class Summary:
    settings: Record
    models: list[str]
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)  # (x, y), x before y in `models`
    labels: Tally | None = None  # the chosen answer against the rejected one
    preference: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)  # model -> accuracy
    dpo_reward: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)
    answers: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (mean repetition, tokens)

    @property
    def pairwise(self) -> bool:
        """Judged pairwise in both orders (else each answer scored alone, by likelihood)."""
        return self.settings.get("judge_mode", "pairwise") == "pairwise"

    def against(self, x: str, y: str) -> Tally:
        found = self.tallies.get((x, y))
        return found if found is not None else self.tallies[(y, x)].flipped()

    def overall(self, x: str) -> Tally | None:
        """x against every other model, all prompts pooled."""
        if not self.tallies:
            return None
        parts = [self.against(x, y) for y in self.models if y != x]
        n = sum(p.n for p in parts)
        bias = sum(p.mean_bias * p.n for p in parts) / n if n else math.nan
        return Tally(sum(p.wins for p in parts), sum(p.ties for p in parts), sum(p.losses for p in parts),
                     sum(p.disagreements for p in parts), bias)  # fmt: skip

    def label_line(self) -> str | None:
        if self.labels is None:
            return None
        share, low, high = self.labels.score()
        return f"judge agreement with the labels: {percent(share, low, high)} over {self.labels.n} pairs"

    def pair_lines(self) -> list[str]:
        lines = []
        for (x, y), t in self.tallies.items():
            win = percent(*t.share("win"))
            lines.append(f"{x} vs {y}: {x} wins {t.wins}, ties {t.ties}, loses {t.losses} of {t.n} prompts; "
                         f"{x}'s win rate {win}; " + (f"the two orders disagreed on {t.disagreements}"
                         if self.pairwise else "each answer scored alone"))  # fmt: skip
        return lines

    def matrix(self) -> str:
        """Row model against column model: wins/ties/losses, then the win share with its Wilson 95% interval."""
        rows = []
        for x in self.models:
            cells = []
            for y in self.models:
                if x == y:
                    cells.append("")
                    continue
                t = self.against(x, y)
                share, low, high = t.share("win")
                cells.append(f"{t.wins}/{t.ties}/{t.losses}: {100 * share:.0f}% [{100 * low:.0f}-{100 * high:.0f}]")
            rows.append([x, *cells])
        return markdown_table(["row vs column", *self.models], rows)

    def model_table(self) -> str:
        header = ["model", "score vs the others", "preference accuracy", "DPO reward accuracy", "repetition",
                  "tokens"]  # fmt: skip
        rows = []
        for name in self.models:
            total = self.overall(name)
            score = f"{percent(*total.score())}, {total.wins}/{total.ties}/{total.losses}" if total else ""
            pref = self.preference.get(name)
            dpo = self.dpo_reward.get(name)
            rep, tokens = self.answers.get(name, (math.nan, math.nan))
            stats = ["" if math.isnan(rep) else f"{rep:.3f}", "" if math.isnan(tokens) else f"{tokens:.1f}"]
            rows.append([name, score, f"{percent(*pref[:3])} of {pref[3]}" if pref else "",
                         f"{percent(*dpo[:3])} of {dpo[3]}" if dpo else "", *stats])  # fmt: skip
        return markdown_table(header, rows)

    def text(self) -> str:
        """What the command prints."""
        parts = [line for line in [self.label_line()] if line]
        if self.labels is not None:
            margin = self.settings["tie_margin"]
            how = (f"both orders judged; they preferred different answers on {self.labels.disagreements} of "
                   f"{self.labels.n} pairs" if self.pairwise else "likelihood judge: each answer scored alone, "
                   "so no order")  # fmt: skip
            parts.append(f"  ({how}; a preference within {margin} of 1/2 is a tie, counted half)")
        if self.tallies:
            parts += ["", self.matrix(), "", *self.pair_lines()]
        if self.models:
            parts += ["", self.model_table()]
        return "\n".join(parts).strip("\n")

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per model: every figure of the table per model, numbers only."""
        out = []
        for name in self.models:
            row: dict[str, Any] = {"model": name}
            if (total := self.overall(name)) is not None:
                row.update(zip(("score", "score_low", "score_high"), total.score(), strict=True))
                row.update(wins=total.wins, ties=total.ties, losses=total.losses)
            for key, found in (("preference_accuracy", self.preference.get(name)),
                               ("dpo_reward_accuracy", self.dpo_reward.get(name))):  # fmt: skip
                if found:
                    row.update({key: found[0], f"{key}_low": found[1], f"{key}_high": found[2], "pairs": found[3]})
            if name in self.answers:
                row.update(repetition=self.answers[name][0], tokens=self.answers[name][1])
            out.append(row)
        return out


def summarize(records: list[Record]) -> Summary:
    """The figures from evaluate.jsonl's records (the first is the settings)."""
    settings = records[0]
    models = list(settings.get("models") or [])
    summary = Summary(settings, models)
    by_kind: dict[str, list[Record]] = {}
    for record in records[1:]:
        by_kind.setdefault(record["kind"], []).append(record)
    margin = float(settings["tie_margin"])
    judgements = by_kind.get("judgement", [])
    orders = {(r["prompt"], r["first"], r["second"]): (r["p_first"], r["p_second"]) for r in judgements}
    for i, x in enumerate(models):
        for y in models[i + 1 :]:
            prompts = sorted({p for p, a, b in orders if {a, b} == {x, y}})
            found = [verdict(orders[(p, x, y)], orders[(p, y, x)]) for p in prompts]
            if found:
                summary.tallies[(x, y)] = tally(found, margin)
    scores = {(r["prompt"], r["model"]): pmi(r["logp"], r["logp_null"], r["tokens"]) for r in by_kind.get("score", [])}
    for i, x in enumerate(models):
        for y in models[i + 1 :]:
            prompts = sorted({p for p, m in scores if m == x and (p, y) in scores})
            if prompts:
                summary.tallies[(x, y)] = tally(
                    (score_verdict(scores[(p, x)], scores[(p, y)]) for p in prompts), margin
                )
    labels = {(r["pair"], r["first"]): (r["p_first"], r["p_second"]) for r in by_kind.get("label", [])}
    pairs = sorted({p for p, _ in labels})
    if pairs:
        summary.labels = tally((verdict(labels[(p, "chosen")], labels[(p, "rejected")]) for p in pairs), margin)
    alone = {(r["pair"], r["answer"]): pmi(r["logp"], r["logp_null"], r["tokens"])
             for r in by_kind.get("label_score", [])}  # fmt: skip
    pairs = sorted({p for p, _ in alone})
    if pairs:
        summary.labels = tally((score_verdict(alone[(p, "chosen")], alone[(p, "rejected")]) for p in pairs), margin)
    logps: dict[str, dict[int, Record]] = {}
    for r in by_kind.get("logps", []):
        logps.setdefault(r["model"], {})[r["pair"]] = r
    for name, found in logps.items():
        summary.preference[name] = accuracy(r["chosen_mean"] > r["rejected_mean"] for r in found.values())
        if name in settings.get("dpo_adapters", []) and "base" in logps:
            base = logps["base"]
            summary.dpo_reward[name] = accuracy(r["chosen"] - base[p]["chosen"] > r["rejected"] - base[p]["rejected"]
                                                for p, r in found.items())  # fmt: skip
    for name in models:
        answers = [r for r in by_kind.get("answer", []) if r["model"] == name]
        if answers:
            summary.answers[name] = (sum(a["repetition"] for a in answers) / len(answers),
                                     sum(a["tokens"] for a in answers) / len(answers))  # fmt: skip
    return summary


def read_records(target: str | Path) -> list[Record]:
    path = Path(target) / "evaluate.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_summary(target: str | Path) -> list[dict[str, Any]]:
    """A finished evaluation's row per model (`Summary.rows`), read back from its evaluate.jsonl."""
    return summarize(read_records(target)).rows()


def write_evaluation(target: Path, summary: Summary, prompts: list) -> None:
    """evaluate.md: the settings, the judge's check, the matrix, a line per pair, the table per model."""
    margin = summary.settings["tie_margin"]
    about = "\n".join(f"- {k}: {v}" for k, v in summary.settings.items() if k not in ("kind", "models") and v)
    parts = ["# Evaluation", "", about, ""]
    if summary.labels is not None:
        how = (
            f"Each pair judged twice (chosen shown first, then rejected), position bias removed by averaging the "
            f"two orders' log-odds; a preference within {margin} of 1/2 is a tie and counts half. The two orders "
            f"preferred different answers on {summary.labels.disagreements} of {summary.labels.n} pairs."
            if summary.pairwise
            else LIKELIHOOD + f" A preference within {margin} of 1/2 is a tie and counts half."
        )
        parts += ["## The judge against the labels", "", summary.label_line() or "", "", how,
                  "Intervals: Wilson score, 95%.", ""]  # fmt: skip
    if summary.tallies:
        parts += ["## Win/tie/loss", "",
                  f"Cells: wins/ties/losses of the row's model against the column's over {len(prompts)} prompts, "
                  "then its win share with the Wilson 95% interval. " + ("Every prompt judged in both orders; a tie is "
                  f"a preference within {margin} of 1/2 after position bias is removed." if summary.pairwise else
                  LIKELIHOOD + f" A tie is a preference within {margin} of 1/2."), "",
                  summary.matrix(), "", *[f"- {line}" for line in summary.pair_lines()], ""]  # fmt: skip
    if summary.models:
        parts += ["## Per model", "",
                  "Score: (wins + ties/2) / comparisons against all the other models. Preference accuracy: share of "
                  "--pairs whose chosen answer has the higher mean log-prob per token. DPO reward accuracy: the "
                  "same with DPO's implicit reward, summed log-probs against the base's. Repetition and tokens: as "
                  "compare (means over the prompts).", "", summary.model_table(), ""]  # fmt: skip
    text = "\n".join(parts).encode()
    atomic_write(target / "evaluate.md", lambda f: f.write(text))
