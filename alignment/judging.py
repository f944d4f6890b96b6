"""The arithmetic of judged comparisons, on plain numbers: position bias removed from a judge's two orders,
ties, win/tie/loss tallies and Wilson intervals. No model, no torch: `evaluate` feeds it probabilities.

A judge sees a question and two answers, shown as A and B, and we read p(A) and p(B) from its next-token
distribution. Its log-odds for the first-shown answer, l = log p(A) - log p(B), mixes what it thinks of the
answers (d) and its taste for a position (b): l = d + b. Judged again with the answers swapped, l' = -d + b. So

    d = (l - l') / 2        (the preference for x over y, position bias removed)
    b = (l + l') / 2        (the position bias of this comparison: > 0 leans to A)

which removes a bias that is the same in both orders exactly (the swap-and-average remedy of Zheng et al.
2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", section 3.4, done on log-odds). The judge
prefers x with probability sigmoid(d); within `margin` of 1/2 it is a tie.

The likelihood judge scores each answer alone, by how much more likely the judge finds it after the question than
after an empty message, per token (its mean pointwise mutual information with the question, in nats):

    s = (log p(answer | question) - log p(answer | empty)) / tokens

and prefers x over y with probability sigmoid(s_x - s_y). Nothing is shown in an order, so there is no position
bias to remove and no two orders to disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
Outcome = Literal["win", "tie", "loss"]


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes / n (Wilson 1927; Agresti & Coull 1998, eq. 2):

        (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)

    Unlike p ± z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1. `successes` may hold
    halves (a tie counted as half a win). (0, 1) when n is 0: nothing is known.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, {n}], got {successes}")
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


@dataclass(frozen=True)
class Verdict:
    """One comparison of x and y judged in both orders."""

    preference: float  # sigmoid(d): the judge's probability that x is the better answer, position bias removed
    bias: float  # b: the log-odds the judge adds to whichever answer is shown first
    first_order_prefers_x: bool  # x shown first: p(A) > p(B)
    second_order_prefers_x: bool  # y shown first: p(B) > p(A)

    @property
    def orders_disagree(self) -> bool:
        return self.first_order_prefers_x != self.second_order_prefers_x

    def outcome(self, margin: float) -> Outcome:
        """'win' for x when preference > 1/2 + margin, 'loss' below 1/2 - margin, else 'tie'."""
        if self.preference > 0.5 + margin:
            return "win"
        if self.preference < 0.5 - margin:
            return "loss"
        return "tie"


def _log_odds(p_a: float, p_b: float) -> float:
    tiny = 1e-300  # a probability the judge rounds to 0 still has an order
    return math.log(max(p_a, tiny)) - math.log(max(p_b, tiny))


def verdict(x_first: tuple[float, float], y_first: tuple[float, float]) -> Verdict:
    """The verdict on x vs y from the judge's (p(A), p(B)) with x shown as A, then with y shown as A."""
    forward = _log_odds(*x_first)  # d + b
    backward = _log_odds(*y_first)  # -d + b
    d, b = (forward - backward) / 2, (forward + backward) / 2
    return Verdict(_sigmoid(d), b, forward > 0, backward < 0)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def pmi(logp: float, logp_null: float, tokens: int) -> float:
    """An answer's likelihood score: (log p(answer | question) - log p(answer | an empty message)) / tokens. The
    answer's own likelihood (its length, its style, a loop predicting itself) is in both terms and cancels."""
    return (logp - logp_null) / max(tokens, 1)


def score_verdict(x: float, y: float) -> Verdict:
    """The verdict on x vs y from their scores, each answer scored without the other: preference sigmoid(x - y),
    no position bias, and both 'orders' the same one."""
    return Verdict(_sigmoid(x - y), 0.0, x > y, x > y)


@dataclass(frozen=True)
class Tally:
    """Outcomes of x against y over n comparisons, with Wilson 95% intervals of each share."""

    wins: int
    ties: int
    losses: int
    disagreements: int  # comparisons whose two orders preferred different answers
    mean_bias: float  # mean b: > 0, the judge leans to the first-shown answer

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def share(self, outcome: Outcome) -> tuple[float, float, float]:
        """(share, low, high) of one outcome; the interval is Wilson's at 95%."""
        count = {"win": self.wins, "tie": self.ties, "loss": self.losses}[outcome]
        return (count / self.n if self.n else math.nan, *wilson_interval(count, self.n))

    def score(self) -> tuple[float, float, float]:
        """(wins + ties / 2) / n, as AlpacaEval and Chatbot Arena count a tie, with its Wilson 95% interval."""
        points = self.wins + self.ties / 2
        return (points / self.n if self.n else math.nan, *wilson_interval(points, self.n))

    def flipped(self) -> Tally:
        """y against x: wins and losses swapped, the same ties, disagreements and bias."""
        return Tally(self.losses, self.ties, self.wins, self.disagreements, self.mean_bias)


def tally(verdicts: Iterable[Verdict], margin: float) -> Tally:
    """Wins, ties and losses of x (each verdict on x vs y), the orders' disagreements and the mean bias."""
    found = list(verdicts)
    outcomes = [v.outcome(margin) for v in found]
    bias = sum(v.bias for v in found) / len(found) if found else math.nan
    return Tally(outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss"),
                 sum(v.orders_disagree for v in found), bias)  # fmt: skip


def percent(share: float, low: float, high: float) -> str:
    """'83.8% (95% interval 68.0-92.9%)'."""
    return f"{100 * share:.1f}% (95% interval {100 * low:.1f}-{100 * high:.1f}%)"


def accuracy(correct: Iterable[bool]) -> tuple[float, float, float, int]:
    """(share, low, high, n) of True values, with the Wilson 95% interval."""
    flags = list(correct)
    n = len(flags)
    hits = sum(flags)
    return (hits / n if n else math.nan, *wilson_interval(hits, n), n)
