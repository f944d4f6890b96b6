"""Likelihood displacement (Razin et al. 2024): the detector on hand-made series, the run's one warning line on a
run made to displace and none on a run that keeps its chosen answers likely, and `report`'s marked region."""

import logging
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from alignment.commands.report import _draw, displacement_note, read_curves  # noqa: E402
from alignment.displacement import WINDOW, RewardPoint, displaced, displacement_spans, slope  # noqa: E402
from alignment.run.rundir import RunDir  # noqa: E402
from alignment.usage import main  # noqa: E402


def series(chosen, margins, every=10):
    return [RewardPoint(every * (i + 1), c, m) for i, (c, m) in enumerate(zip(chosen, margins, strict=True))]


def test_slope_is_the_least_squares_fit():
    assert slope([0, 1, 2], [1, 3, 5]) == 2.0
    assert slope([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.2)  # (Σ(x-1.5)(y-0.5)) / Σ(x-1.5)² = 1 / 5
    assert slope([4, 4], [1, 2]) == 0.0


def test_chosen_below_zero_and_falling_while_the_margin_grows_is_displacement():
    assert displaced(series([-0.01, -0.05, -0.08, -0.2, -0.3], [0.02, 0.1, 0.2, 0.3, 0.5]))
    # noisy but falling: a least-squares trend, not every step
    assert displaced(series([-0.1, -0.15, -0.12, -0.2, -0.18], [0.2, 0.3, 0.28, 0.4, 0.45]))


@pytest.mark.parametrize(
    "chosen, margins, why",
    [
        ([0.05, 0.1, 0.15, 0.2, 0.25], [0.1, 0.2, 0.3, 0.4, 0.5], "chosen rising above 0: the healthy case"),
        ([0.02, -0.05, -0.08, -0.2, -0.3], [0.02, 0.1, 0.2, 0.3, 0.5], "one point above 0"),
        ([-0.3, -0.2, -0.15, -0.1, -0.05], [0.1, 0.2, 0.3, 0.4, 0.5], "below 0 but recovering"),
        ([-0.01, -0.05, -0.08, -0.2, -0.3], [0.5, 0.4, 0.3, 0.2, 0.1], "the margin shrinking: a run going wrong"),
        ([-0.2, -0.2, -0.2, -0.2, -0.2], [0.1, 0.2, 0.3, 0.4, 0.5], "flat below 0"),
    ],
)
def test_other_series_are_not(chosen, margins, why):
    assert not displaced(series(chosen, margins)), why


def test_spans_merge_overlapping_windows_and_skip_nan():
    chosen = [0.1, 0.05, -0.01, -0.05, -0.1, -0.2, -0.3, -0.35, -0.3, -0.2, -0.1, -0.05, 0.0]
    margins = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
    points = series(chosen, margins)
    # windows of 5 all below 0: starting at step 30 (to 70), 40 (to 80) and 50 (to 90); 60-100 has chosen rising
    assert [displaced(points[i : i + WINDOW]) for i in (2, 3, 4, 5)] == [True, True, True, False]
    assert displacement_spans(points) == [(30, 90)]
    assert displacement_spans([*points[:3], RewardPoint(35, math.nan, 0.1), *points[3:]]) == [(30, 90)]
    assert displacement_spans(points[:6]) == []  # fewer points below 0 than a window
    assert displacement_spans(points, window=3) == [(30, 80)]  # 70-90 (-0.3, -0.35, -0.3) is flat: slope 0


DEMO = ["--config", "demo_dpo.yaml", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6",
        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--model.learning_rate", "5e-3", "--model.warmup_ratio", "0"]  # fmt: skip


def fit(root, caplog, *flags):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignment.run.callbacks"):
        main(["fit", *DEMO, "--trainer.default_root_dir", str(root), *flags])
    return [r.getMessage() for r in caplog.records if "likelihood displacement" in r.getMessage()]


def test_a_displacing_run_warns_once_and_report_marks_it(tmp_path, caplog):
    """Plain DPO on the demo pairs at 5e-3 without warmup: the chosen answers' rewards fall below 0 from the first
    steps while the margin grows. With RPO's NLL term on the chosen answers (rpo_alpha 1) they rise above 0."""
    warnings = fit(tmp_path / "dpo", caplog)
    assert len(warnings) == 1, warnings
    assert "rewards/chosen fell" in warnings[0] and "--model.rpo_alpha" in warnings[0]
    assert "learning_rate" in warnings[0] and "fewer epochs" in warnings[0]

    curves = read_curves(RunDir(tmp_path / "dpo"))
    fig, ax = plt.subplots()
    _draw(ax, [curves], "rewards/chosen")
    spans = [patch for patch in ax.patches if "likelihood displacement" in patch.get_label()]
    assert spans, "no marked region on the rewards/chosen curve"
    plt.close(fig)
    assert "dpo: from step" in displacement_note([curves])

    warnings = fit(tmp_path / "rpo", caplog, "--model.rpo_alpha", "1.0")
    assert warnings == []
    curves = read_curves(RunDir(tmp_path / "rpo"))
    assert curves.train["rewards/chosen"].iloc[-1] > 0  # the NLL term keeps the chosen answers likely
    fig, ax = plt.subplots()
    _draw(ax, [curves], "rewards/chosen")
    assert not ax.patches
    plt.close(fig)
    assert "none of the runs" in displacement_note([curves])
