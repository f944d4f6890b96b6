"""Likelihood displacement (Razin et al. 2024): the detector on hand-made series, the run's one warning line on a
run made to displace and none on a run that keeps its chosen answers likely, and `report`'s marked region."""

import logging
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from alignment.commands.report import _draw, displacement_note, read_curves  # noqa: E402
from alignment.displacement import WINDOW, RewardPoint, displaced, displacement_spans, slope  # noqa: E402
from alignment.run.callbacks import DisplacementWarning  # noqa: E402
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


@pytest.mark.slow
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


class FakeTrainer:
    """What DisplacementWarning reads of a trainer: the logged metrics, the step and whether it is process 0."""

    def __init__(self, is_global_zero=True):
        self.callback_metrics, self.global_step, self.is_global_zero = {}, 0, is_global_zero

    def log(self, step, chosen, margin):
        self.global_step = step
        self.callback_metrics.update({"train/rewards/chosen": torch.tensor(chosen),
                                      "train/rewards/margins": torch.tensor(margin)})  # fmt: skip


class FakeModule:
    def __init__(self, has_reference, **hparams):
        self.has_reference, self.hparams = has_reference, hparams


def feed(callback, trainer, module, chosen, margins):
    """Logs the series, with a batch start between logs that logged nothing (the values stay in the metrics)."""
    callback.on_train_start(trainer, module)
    for step, (c, m) in enumerate(zip(chosen, margins, strict=True), start=1):
        trainer.log(step * 2, c, m)
        callback.on_train_batch_start(trainer, module, None, 0)
        trainer.global_step += 1
        callback.on_train_batch_start(trainer, module, None, 0)
    callback.on_train_end(trainer, module)


FALLING = ([-0.01, -0.05, -0.08, -0.2, -0.3, -0.4, -0.5], [0.02, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7])


def test_the_callback_warns_once_for_a_method_with_a_reference_on_process_0(caplog):
    callback, trainer = DisplacementWarning(), FakeTrainer()
    with caplog.at_level(logging.WARNING, logger="alignment.run.callbacks"):
        feed(callback, trainer, FakeModule(True, rpo_alpha=0.0), *FALLING)
    assert [p.step for p in callback.points] == [6, 8, 10, 12, 14]  # one point a log, not a batch
    assert callback.warned_at == 10 and len(caplog.records) == 1
    assert "from step 2" in caplog.records[0].getMessage() and "--model.rpo_alpha" in caplog.records[0].getMessage()

    resumed = DisplacementWarning()
    resumed.load_state_dict(callback.state_dict())
    assert resumed.points == callback.points and resumed.warned_at == 10  # a resumed run does not warn again


@pytest.mark.parametrize("module, trainer", [
    (FakeModule(False), FakeTrainer()),  # ORPO, SimPO, CPO: rewards are the policy's own log-probs, below 0
    (FakeModule(True, rpo_alpha=0.0), FakeTrainer(is_global_zero=False)),  # DDP: process 0 says it
])  # fmt: skip
def test_the_callback_is_silent_without_a_reference_and_off_process_0(caplog, module, trainer):
    with caplog.at_level(logging.WARNING, logger="alignment.run.callbacks"):
        feed(DisplacementWarning(), trainer, module, *FALLING)
    assert caplog.records == []


def test_kto_is_not_told_of_rpo_alpha(caplog):
    with caplog.at_level(logging.WARNING, logger="alignment.run.callbacks"):
        feed(DisplacementWarning(), FakeTrainer(), FakeModule(True, beta=0.1), *FALLING)
    (record,) = caplog.records
    assert "rpo_alpha" not in record.getMessage() and "learning_rate" in record.getMessage()
