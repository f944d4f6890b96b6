"""`evaluate`: the arithmetic of judged comparisons on hand-made judgements (Wilson intervals, position bias removed
from the two orders, ties, win/tie/loss tallies), the tables recomputed from evaluate.jsonl's records, the command
line's mistakes, and on the tiny model: every cell backed by a record, answers cached, a stopped evaluation
continued."""

from __future__ import annotations

import json
import math

import pytest

from alignment.commands.evaluate_tables import Summary, evaluate_summary, summarize
from alignment.commands.judge import read_template
from alignment.errors import ConfigError
from alignment.judging import Tally, Verdict, accuracy, percent, pmi, score_verdict, tally, verdict, wilson_interval
from alignment.usage import main
from tests.helpers import write_jsonl
from tests.test_usage import error_line, run_cli


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def judged(d: float, b: float, mass: float = 0.6) -> tuple[tuple[float, float], tuple[float, float]]:
    """What a judge with preference log-odds d for x and position bias b (log-odds added to the first-shown answer)
    says in the two orders, as (p(A), p(B)) with `mass` on the two labels together."""
    first, second = sigmoid(d + b), sigmoid(-d + b)
    return (mass * first, mass * (1 - first)), (mass * second, mass * (1 - second))


def test_wilson_interval_by_hand():
    # p = 0.8, n = 10, z = 1.96: (0.8 + 0.19208 -+ 1.96 sqrt(0.016 + 0.009604)) / 1.38416
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] < 1  # not empty at p = 1
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing seen: nothing known
    assert wilson_interval(33.5, 40) == pytest.approx((0.6948, 0.9211), abs=1e-4)  # a tie counts half
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.mark.parametrize(("d", "b"), [(0.8, 0.0), (0.8, 2.5), (-1.2, -3.0), (0.0, 4.0), (0.3, -0.7)])
def test_a_bias_the_same_in_both_orders_is_removed_exactly(d, b):
    x_first, y_first = judged(d, b)
    found = verdict(x_first, y_first)
    assert found.preference == pytest.approx(sigmoid(d))
    assert found.bias == pytest.approx(b)


def test_orders_disagree_when_the_position_outweighs_the_answers():
    # a judge that says A whatever it is shown: both orders lean to the first answer, so they disagree on x
    always_a = verdict((0.9, 0.1), (0.9, 0.1))
    assert always_a.orders_disagree and always_a.preference == pytest.approx(0.5)
    assert always_a.bias == pytest.approx(math.log(9)) and always_a.outcome(0.05) == "tie"
    # a strong preference for x survives a bias toward A: both orders pick x
    clear = verdict(*judged(3.0, 1.0))
    assert not clear.orders_disagree and clear.first_order_prefers_x and clear.second_order_prefers_x
    # a weak preference under a strong bias: the orders disagree, yet the preference is recovered
    weak = verdict(*judged(0.4, 2.0))
    assert weak.orders_disagree and weak.preference == pytest.approx(sigmoid(0.4))


def test_ties_within_the_margin():
    def at(p: float) -> Verdict:
        return Verdict(p, 0.0, p > 0.5, p > 0.5)

    assert [at(p).outcome(0.05) for p in (0.56, 0.54, 0.5, 0.46, 0.44)] == ["win", "tie", "tie", "tie", "loss"]
    assert at(0.51).outcome(0.0) == "win" and at(0.5).outcome(0.0) == "tie"


def test_tally_and_score_by_hand():
    verdicts = [verdict(*judged(d, b)) for d, b in [(2, 0), (1, 3), (0.1, 0), (-0.1, 0), (-2, 1), (3, -1)]]
    # sigmoid: 0.881 win, 0.731 win (orders disagree: bias 3 > d 1), 0.525 tie, 0.475 tie, 0.119 loss, 0.953 win
    t = tally(verdicts, margin=0.05)
    assert (t.wins, t.ties, t.losses, t.n, t.disagreements) == (3, 2, 1, 6, 1)
    assert t.mean_bias == pytest.approx(0.5)  # (0 + 3 + 0 + 0 + 1 - 1) / 6
    assert t.share("win") == pytest.approx((0.5, *wilson_interval(3, 6)))
    assert t.score()[0] == pytest.approx(4 / 6)  # (3 wins + 2 ties / 2) / 6
    flipped = t.flipped()
    assert (flipped.wins, flipped.ties, flipped.losses) == (1, 2, 3)
    assert tally([verdict(*judged(0.1, 0))], margin=0.0).wins == 1  # no margin: any lean is a win


def test_percent_and_accuracy():
    assert percent(0.8375, 0.68, 0.929) == "83.8% (95% interval 68.0-92.9%)"
    share, low, high, n = accuracy([True, True, True, False])
    assert (share, n) == (0.75, 4) and (low, high) == wilson_interval(3, 4)


def records() -> list[dict]:
    """Hand-made evaluate.jsonl: 3 models, 2 prompts, 2 labelled pairs."""
    out: list[dict] = [{"kind": "settings", "tie_margin": 0.05, "models": ["base", "dpo", "orpo"],
                        "dpo_adapters": ["dpo"]}]  # fmt: skip
    prefs = {("base", "dpo"): [-1.0, -2.0], ("base", "orpo"): [0.0, 1.5], ("dpo", "orpo"): [0.05, -1.0]}
    for (x, y), ds in prefs.items():
        for prompt, d in enumerate(ds):
            x_first, y_first = judged(d, 1.0)
            out.append({"kind": "judgement", "prompt": prompt, "first": x, "second": y,
                        "p_first": x_first[0], "p_second": x_first[1]})  # fmt: skip
            out.append({"kind": "judgement", "prompt": prompt, "first": y, "second": x,
                        "p_first": y_first[0], "p_second": y_first[1]})  # fmt: skip
    for pair, d in enumerate([2.0, -0.01]):  # the judge agrees on pair 0, ties on pair 1
        chosen_first, rejected_first = judged(d, 0.5)
        out.append({"kind": "label", "pair": pair, "first": "chosen", "second": "rejected",
                    "p_first": chosen_first[0], "p_second": chosen_first[1]})  # fmt: skip
        out.append({"kind": "label", "pair": pair, "first": "rejected", "second": "chosen",
                    "p_first": rejected_first[0], "p_second": rejected_first[1]})  # fmt: skip
    logps = {"base": [(-10, -12), (-9, -8)], "dpo": [(-8, -14), (-9, -7)], "orpo": [(-5, -9), (-4, -6)]}
    for model, found in logps.items():
        for pair, (c, r) in enumerate(found):
            out.append({"kind": "logps", "model": model, "pair": pair, "chosen": c, "rejected": r,
                        "chosen_mean": c / 4, "rejected_mean": r / 5})  # fmt: skip
    for model, reps in {"base": [0.0, 0.5], "dpo": [0.1, 0.1], "orpo": [0.0, 0.0]}.items():
        out += [{"kind": "answer", "model": model, "prompt": i, "text": "t", "tokens": 10 * (i + 1), "repetition": r}
                for i, r in enumerate(reps)]  # fmt: skip
    return out


def test_summary_from_records_by_hand(tmp_path):
    summary = summarize(records())
    assert isinstance(summary, Summary)
    base_dpo = summary.against("base", "dpo")
    assert (base_dpo.wins, base_dpo.ties, base_dpo.losses) == (0, 0, 2)
    assert (summary.against("dpo", "base").wins, summary.against("dpo", "base").losses) == (2, 0)
    base_orpo = summary.against("base", "orpo")  # d = 0 is a tie, 1.5 a win
    assert (base_orpo.wins, base_orpo.ties, base_orpo.losses) == (1, 1, 0)
    dpo_orpo = summary.against("dpo", "orpo")  # sigmoid(0.05) = 0.5125: within 0.05 of 1/2
    assert (dpo_orpo.wins, dpo_orpo.ties, dpo_orpo.losses) == (0, 1, 1)
    # bias 1: the orders disagree where |d| < 1 (d = 0.05, 0), not on -2, 1.5, nor on -1 (order x-first is even)
    assert (base_dpo.disagreements, base_orpo.disagreements, dpo_orpo.disagreements) == (0, 1, 1)
    assert summary.labels is not None and (summary.labels.wins, summary.labels.ties) == (1, 1)
    agreement = percent(0.75, *wilson_interval(1.5, 2))
    assert summary.label_line() == f"judge agreement with the labels: {agreement} over 2 pairs"
    # preference accuracy on means: base -2.5 > -2.4? no; -2.25 > -1.6? no; dpo -2 > -2.8 yes, -2.25 > -1.4 no
    assert summary.preference["base"][0] == 0.0 and summary.preference["dpo"][0] == 0.5
    assert summary.preference["orpo"][0] == 1.0  # -1.25 > -1.8 and -1 > -1.2
    # DPO's implicit reward against the base: pair 0: (-8 + 10) - (-14 + 12) = 4 > 0; pair 1: 0 - 1 < 0
    assert summary.dpo_reward["dpo"][0] == 0.5 and "orpo" not in summary.dpo_reward
    assert summary.answers["base"] == (0.25, 15.0)
    matrix = summary.matrix()
    assert "| dpo | 2/0/0: 100% [34-100] |  | 0/1/1: 0% [0-66] |" in matrix
    rows = {row["model"]: row for row in summary.rows()}
    assert rows["orpo"]["wins"] == 1 and rows["orpo"]["ties"] == 2 and rows["orpo"]["losses"] == 1
    assert rows["dpo"]["dpo_reward_accuracy"] == 0.5 and rows["base"]["repetition"] == 0.25
    write_jsonl(tmp_path / "evaluate.jsonl", records())
    assert evaluate_summary(tmp_path) == summary.rows()  # what a sweep reads back


def test_tally_of_nothing_is_not_a_number():
    t = Tally(0, 0, 0, 0, math.nan)
    assert math.isnan(t.score()[0]) and t.score()[1:] == (0.0, 1.0)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompts", "p.txt"], "error: --prompts: win-rates need two or more models"),
        (["--prompts", "p.txt", "--adapter", "x=runs/x"], "error: --prompts: win-rates need a --judge"),
        (["--pairs", "p.jsonl"], "error: --pairs: name a --judge to check, or --adapter / --base models"),
        ([], "error: --prompts (win-rates between models) or --pairs"),
        (["--pairs", "p.jsonl", "--judge", "tiny", "--tie-margin", "0.5"], "error: --tie-margin must be within"),
        (["--pairs", "p.jsonl", "--pairs-rows", "ten"], "error: argument --pairs-rows: expected START:STOP"),
        (["--pairs", "missing.jsonl", "--judge", "tiny"], "error: missing.jsonl: no such file"),
    ],
)
def test_evaluate_mistakes_are_one_line_naming_the_flag(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", *args, "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines


@pytest.mark.slow
def test_a_mistake_through_the_real_command_line(tmp_path):
    line = error_line(run_cli("evaluate", "--prompts", "p.txt", "--judge", "tiny", "--out", str(tmp_path / "out")))
    assert line.startswith("error: --prompts: win-rates need two or more models: the base and at least one --adapter")


def test_a_judge_template_without_its_fields_is_refused(tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("# a comment\nWhich is better, {answer_a} or {answer_b}?\n")
    fields = "{question}, {answer_a}, {answer_b}"
    with pytest.raises(
        ConfigError, match=f"^--judge-template {template}: no {{question}} in it \\(it needs {fields}\\)$"
    ):
        read_template(template)
    assert "{answer_b}" in read_template(None) and not read_template(None).startswith("#")  # the default, comments cut


@pytest.mark.slow
def test_the_judge_alone_on_labelled_pairs_prints_its_agreement(tmp_path):
    """`evaluate --pairs F --judge J --out D`: no models, the judge checked against the labels, every judgement in
    both orders in evaluate.jsonl (the tiny judge is random: the figure itself means nothing here)."""
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": f"{i}{i}{i}"} for i in range(5)]
    pairs = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    result = run_cli(
        "evaluate", "--pairs", str(pairs), "--judge", "tiny", "--judge-mode", "pairwise", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("judge agreement with the labels: ") and first.endswith("%) over 5 pairs"), first
    records = [json.loads(line) for line in (out / "evaluate.jsonl").read_text().splitlines()]
    labels = [r for r in records if r["kind"] == "label"]
    expected = sorted((p, first) for p in range(5) for first in ("chosen", "rejected"))
    assert sorted((r["pair"], r["first"]) for r in labels) == expected
    assert all(0 < r["p_first"] < 1 and 0 < r["p_second"] < 1 for r in labels)
    assert summarize(records).label_line() == first
    assert first in (out / "evaluate.md").read_text()
    assert not (out / ".evaluate.progress.jsonl").exists()


@pytest.mark.slow
def test_every_cell_comes_from_records_and_a_stopped_evaluation_continues(tmp_path, monkeypatch):
    """Base, DPO and ORPO demo adapters judged by the tiny model: stopped during the judging, run again it judges
    only what was left and generates nothing (answers cached); another judge regenerates nothing either."""
    from alignment.commands import evaluate
    from alignment.commands.judge import Judge
    from alignment.model.generate import DecodeOptions
    from tests.demo_runs import demo_run

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("What is 2 + 2?", "Count to 3.", "Hi")])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i} + 1?", "chosen": str(i + 1), "rejected": "1 1 1 1"}
                                                    for i in range(4)])  # fmt: skip
    settings = dict(prompts=prompts, pairs=pairs, judge="tiny", judge_mode="pairwise", batch_size=4,
                    decode=DecodeOptions(max_new_tokens=6), out=tmp_path / "ev",
                    adapters=[f"dpo={demo_run('dpo')}", f"orpo={demo_run('orpo')}"])  # fmt: skip
    judged_rows, generated = [], []
    probabilities, generate_ids = Judge.probabilities, evaluate.generate_ids

    def judge_then_stop(self, prompts):
        if len(judged_rows) == 3:  # 2 batches of labels (4 pairs x 2 orders), 1 of answers, then a stop
            raise KeyboardInterrupt
        judged_rows.append(len(prompts))
        return probabilities(self, prompts)

    monkeypatch.setattr(Judge, "probabilities", judge_then_stop)
    monkeypatch.setattr(evaluate, "generate_ids", lambda *a, **k: generated.append(1) or generate_ids(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_evaluate(**settings)
    assert generated and not (tmp_path / "ev" / "evaluate.jsonl").exists()
    judged_rows.clear(), generated.clear()
    monkeypatch.setattr(Judge, "probabilities", lambda self, prompts: judged_rows.append(len(prompts)) or
                        probabilities(self, prompts))  # fmt: skip
    out = evaluate.run_evaluate(**settings)
    assert generated == [] and sum(judged_rows) == 3 * 3 * 2 - 4  # 3 prompts x 3 pairs of models x 2 orders
    records = [json.loads(line) for line in (out / "evaluate.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert [kinds.count(k) for k in ("judgement", "label", "logps", "answer")] == [18, 8, 12, 9]
    summary = summarize(records)
    for x, y in [("base", "dpo"), ("base", "orpo"), ("dpo", "orpo")]:
        assert summary.against(x, y).n == 3  # every prompt, both orders found
    text = (out / "evaluate.md").read_text()
    assert summary.matrix() in text and summary.model_table() in text and summary.label_line() in text
    assert set(summary.preference) == {"base", "dpo", "orpo"} and set(summary.dpo_reward) == {"dpo"}
    assert not (out / ".evaluate.progress.jsonl").exists()

    template = tmp_path / "judge.txt"
    template.write_text("Q: {question}\nA: {answer_a}\nB: {answer_b}\nBetter:")
    judged_rows.clear()
    evaluate.run_evaluate(**{**settings, "judge_template": template, "out": tmp_path / "ev2"})
    assert generated == [] and sum(judged_rows) == 18 + 8  # another judge: everything judged, nothing generated


def test_likelihood_scores_by_hand():
    """The likelihood judge: (log p(a | question) - log p(a | empty)) / tokens, and sigmoid of the difference."""
    assert pmi(-10.0, -16.0, 3) == 2.0 and pmi(0.0, 0.0, 0) == 0.0  # an empty answer scores 0
    loop = pmi(-4.0, -4.5, 20)  # a loop predicts itself after the question and after nothing alike: near 0
    right = pmi(-12.0, -30.0, 9)  # the docstring the question asks for: much likelier after it
    v = score_verdict(right, loop)
    assert v.preference == pytest.approx(sigmoid(2.0 - 0.025)) and v.bias == 0.0 and not v.orders_disagree
    assert score_verdict(loop, right).preference == pytest.approx(1 - v.preference)
    assert score_verdict(-800.0, 0.0).preference == pytest.approx(0.0) and score_verdict(800.0, 0.0).preference == 1.0
    t = tally([score_verdict(1.0, 0.0), score_verdict(0.0, 0.5), score_verdict(0.1, 0.0)], margin=0.05)
    assert (t.wins, t.ties, t.losses, t.disagreements, t.mean_bias) == (1, 1, 1, 0, 0.0)

    def score(prompt, model, logp, null, tokens):
        return {"kind": "score", "prompt": prompt, "model": model, "logp": logp, "logp_null": null, "tokens": tokens}

    records = [{"kind": "settings", "tie_margin": 0.05, "judge_mode": "likelihood", "models": ["base", "dpo"]},
               score(0, "base", -10.0, -12.0, 2), score(0, "dpo", -10.0, -10.0, 2),  # base +1.0/token, dpo 0
               score(1, "base", -6.0, -6.0, 3), score(1, "dpo", -3.0, -9.0, 3),  # base 0, dpo +2.0/token
               *({"kind": "label_score", "pair": 0, "answer": a, "logp": lp, "logp_null": -9.0, "tokens": 3}
                 for a, lp in (("chosen", -3.0), ("rejected", -9.0)))]  # fmt: skip
    summary = summarize(records)
    assert (summary.against("base", "dpo").wins, summary.against("base", "dpo").losses) == (1, 1)
    assert summary.labels is not None and summary.labels.wins == 1 and summary.labels.disagreements == 0
    assert "likelihood judge: each answer scored alone" in summary.text()
    assert all(line.endswith("each answer scored alone") for line in summary.pair_lines())


@pytest.mark.slow
def test_the_likelihood_judge_on_labelled_pairs_by_default(tmp_path):
    """`evaluate --pairs F --judge tiny`: each answer of each pair scored once, its two log-probs and length in
    evaluate.jsonl, the agreement recomputed from them; a batch's figures are those of each answer alone."""
    from alignment.commands.judge import load_judge

    rows = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": f"{i}{i}{i} {i}"} for i in range(5)]
    pairs = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    result = run_cli("evaluate", "--pairs", str(pairs), "--judge", "tiny", "--batch-size", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("judge agreement with the labels: ") and first.endswith("%) over 5 pairs"), first
    records = [json.loads(line) for line in (out / "evaluate.jsonl").read_text().splitlines()]
    assert records[0]["judge_mode"] == "likelihood" and not any(r["kind"] == "label" for r in records)
    scored = {(r["pair"], r["answer"]): r for r in records if r["kind"] == "label_score"}
    assert sorted(scored) == sorted((p, a) for p in range(5) for a in ("chosen", "rejected"))
    assert all(r["logp"] < 0 and r["logp_null"] < 0 and r["tokens"] >= 1 for r in scored.values())
    assert summarize(records).label_line() == first and first in (out / "evaluate.md").read_text()

    judge = load_judge("tiny", None, mode="likelihood")
    items = [judge.render_answer(row["prompt"], row["rejected"]) for row in rows[:3]]
    together = judge.likelihoods(items)  # padded to the longest
    for i, item in enumerate(items):
        assert together[i] == pytest.approx(judge.likelihoods([item])[0], abs=1e-4)
        assert together[i][:2] == pytest.approx((scored[(i, "rejected")]["logp"], scored[(i, "rejected")]["logp_null"]),
                                                abs=1e-4)  # fmt: skip


@pytest.mark.slow
def test_the_likelihood_judge_reads_no_template(tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("Q: {question}\nA: {answer_a}\nB: {answer_b}\nBetter:")
    line = error_line(run_cli("evaluate", "--pairs", "p.jsonl", "--judge", "tiny", "--judge-template", str(template),
                              "--out", str(tmp_path / "out")))  # fmt: skip
    assert line.startswith("error: --judge-template: the likelihood judge reads no template"), line
