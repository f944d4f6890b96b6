"""Likelihood displacement: the chosen answers becoming less likely under the policy than under the reference while
the preference margin grows (Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct
Preference Optimization", arXiv:2410.08847). The margin rises because the rejected answers fall faster than the
chosen ones; the probability both lose goes to other answers. Read from the logged rewards of a method that scores
a reference (DPO's `rewards/chosen` = beta * (log pi - log pi_ref) of the chosen answers; KTO's, of the desirable).

Pure Python over logged values: `report` reads it without loading torch, the run's callback with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

WINDOW = 5  # logged points (train logs: every log_every_n_steps optimizer steps) a verdict reads
# the methods whose rewards/chosen is measured against a reference, by the class name a run's config names
REFERENCE_METHODS = ("DPO", "KTO")


class RewardPoint(NamedTuple):
    """One logged train point: the optimizer step and the mean rewards/chosen and rewards/margins logged there."""

    step: int
    chosen: float
    margin: float


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys against xs (0 when the xs do not vary)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


def displaced(window: Sequence[RewardPoint]) -> bool:
    """Whether a window of logged points shows likelihood displacement: every rewards/chosen below 0 (the chosen
    answers less likely than under the reference), the least-squares slope of rewards/chosen over the steps below 0
    (still falling) and that of rewards/margins above 0 (the margin still growing)."""
    if len(window) < 2:
        return False
    steps = [float(p.step) for p in window]
    return (
        all(p.chosen < 0 for p in window)
        and slope(steps, [p.chosen for p in window]) < 0
        and slope(steps, [p.margin for p in window]) > 0
    )


def displacement_spans(points: Sequence[RewardPoint], window: int = WINDOW) -> list[tuple[int, int]]:
    """The (first step, last step) of each stretch of the run where displacement holds: every window of `window`
    consecutive points (in step order) that is `displaced`, overlapping ones merged. Points with a NaN are skipped."""
    points = sorted((p for p in points if p.chosen == p.chosen and p.margin == p.margin), key=lambda p: p.step)
    spans: list[tuple[int, int]] = []
    for end in range(window, len(points) + 1):
        chunk = points[end - window : end]
        if not displaced(chunk):
            continue
        start, last = chunk[0].step, chunk[-1].step
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], last)
        else:
            spans.append((start, last))
    return spans
