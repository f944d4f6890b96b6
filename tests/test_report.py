"""`report`: one PNG per metric with train and validation of every run on the same axes, and report.md."""

import csv
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from alignment.commands.report import (  # noqa: E402
    PLOTTED,
    _draw,
    metric_figure,
    overview_figure,
    read_curves,
    run_labels,
)
from alignment.errors import DataError  # noqa: E402
from alignment.run.rundir import RunDir  # noqa: E402
from alignment.usage import main  # noqa: E402
from tests.demo_runs import demo_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def last_logged(metrics_csv, column):
    with open(metrics_csv) as f:
        values = [row[column] for row in csv.DictReader(f) if row.get(column)]
    return float(values[-1])


def markdown_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


@pytest.mark.slow
def test_report_writes_a_plot_per_metric_and_the_final_values_of_each_run(tmp_path):
    dpo, orpo = demo_run("dpo"), demo_run("orpo")
    main(["report", str(dpo), str(orpo), "--out", str(tmp_path / "report")])

    out = tmp_path / "report"
    for name in [m.replace("/", "_") for m in PLOTTED] + ["curves"]:
        image = out / f"{name}.png"
        assert image.read_bytes()[:8] == PNG_MAGIC
        assert plt.imread(image).shape[0] > 100  # a real raster, not an empty file
    rows = markdown_rows((out / "report.md").read_text())
    assert [row["run"] for row in rows] == ["dpo", "orpo"]
    for row, run in zip(rows, (dpo, orpo), strict=True):
        for metric in PLOTTED:
            for split in ("train", "val"):
                expected = last_logged(run / "metrics.csv", f"{split}/{metric}")
                assert float(row[f"{split}/{metric}"]) == pytest.approx(expected, rel=1e-3)


def test_each_plot_has_train_lines_and_val_markers_per_run_with_a_legend():
    curves = [read_curves(RunDir(demo_run("dpo"))), read_curves(RunDir(demo_run("orpo")))]
    fig, ax = plt.subplots()
    _draw(ax, curves, "rewards/margins")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["dpo train", "dpo val", "orpo train", "orpo val"]
    assert lines[0].get_linestyle() == "-" and lines[1].get_linestyle() == "None" and lines[1].get_marker() == "o"
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()  # one colour per run
    assert list(lines[0].get_xdata()) == list(curves[0].train.index)  # against the optimizer step
    plt.close(fig)


def test_a_step_logged_twice_keeps_its_latest_row_and_splits_train_from_val(tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n"
        ",2,0.9,\n,4,0.8,\n"  # logged, then lost to an interrupt before the checkpoint at step 2...
        ",4,0.7,\n,6,0.6,\n0,5,,0.65\n"  # ...and logged again after resuming
    )
    curves = read_curves(RunDir(run))
    assert list(curves.train.index) == [2, 4, 6] and list(curves.train["loss"]) == [0.9, 0.7, 0.6]
    assert list(curves.val.index) == [6] and curves.final("val", "loss") == 0.65  # validated after step 6
    assert math.isnan(curves.final("val", "rewards/chosen"))  # never logged


def test_default_output_is_beside_the_first_run_and_labels_tell_same_named_runs_apart(tmp_path):
    run = demo_run("orpo")
    main(["report", str(run)])
    assert (run.parent / "report" / "report.md").is_file()
    a, b = RunDir(tmp_path / "sweep1" / "run"), RunDir(tmp_path / "sweep2" / "run")
    assert run_labels([a, b]) == ["sweep1/run", "sweep2/run"]
    curves = read_curves(RunDir(run))
    assert curves.method == "ORPO" and len(curves.train) > 0 and "rewards/accuracies" in curves.val


def test_bad_runs_are_named_in_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert f"run directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metrics.csv does not exist"):
        read_curves(RunDir(tmp_path / "empty"))


def test_validation_lands_on_the_step_after_which_it_ran():
    """The demo run validates once, at the end of its epoch of 6 steps; Lightning logs it at step 5."""
    run = demo_run("dpo")
    with open(run / "metrics.csv") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row.get("val/loss")]
    curves = read_curves(RunDir(run))
    assert logged == [5] and list(curves.val.index) == [6] == [curves.train.index.max()]
    assert curves.method == "DPO"


def panels(fig):
    return [ax for ax in fig.axes if ax.axison]


def test_methods_get_their_own_panels_each_with_a_y_label():
    curves = [read_curves(RunDir(demo_run("dpo")), "dpo"), read_curves(RunDir(demo_run("orpo")), "orpo")]
    for fig in (overview_figure(curves), *(metric_figure(curves, m) for m in PLOTTED)):
        shown = panels(fig)
        assert shown and all(ax.get_ylabel() for ax in shown)  # every panel says what its axis measures
        for ax in shown:  # no panel mixes DPO's loss (~0.7) with ORPO's (NLL included, far larger)
            runs = {line.get_label().split()[0] for line in ax.get_lines()}
            assert len(runs) == 1, (ax.get_title(), runs)
        plt.close(fig)
    fig = metric_figure(curves, "loss")
    assert [(ax.get_title(), ax.get_ylabel()) for ax in panels(fig)] == [("loss (DPO)", "DPO loss"),
                                                                       ("loss (ORPO)", "NLL + β·L_OR")]  # fmt: skip
    assert [line.get_color() for ax in panels(fig) for line in ax.get_lines()] == ["C0", "C0", "C1", "C1"]
    plt.close(fig)
    fig = overview_figure(curves[:1])  # one method: the 2 x 3 figure, its sixth panel the legend
    assert len(fig.axes) == 6 and len(panels(fig)) == 5
    plt.close(fig)


def test_report_over_a_glob_skips_what_is_not_a_run(tmp_path, capsys, caplog):
    runs = tmp_path / "runs"
    (runs / "report").mkdir(parents=True)  # an earlier report's output
    (runs / "notes.txt").write_text("not a run")
    (runs / "dpo").mkdir()
    (runs / "dpo" / "metrics.csv").write_text((demo_run("dpo") / "metrics.csv").read_text())
    paths = sorted(str(p) for p in runs.iterdir())
    caplog.set_level("INFO", logger="alignment")
    main(["report", *paths, "--out", str(tmp_path / "out")])
    assert [row["run"] for row in markdown_rows((tmp_path / "out" / "report.md").read_text())] == ["dpo"]
    (note,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert str(runs / "report") in note and str(runs / "notes.txt") in note and "/dpo" not in note

    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs / "report"), str(runs / "notes.txt")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "none of" in err and "metrics.csv" in err


def test_a_run_with_one_logged_point_draws_a_visible_marker(tmp_path):
    """A line through one point is invisible: a short series gets a marker on each point (a long one stays a line)."""
    run = tmp_path / "short"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n,1,0.69\n")
    fig, ax = plt.subplots()
    _draw(ax, [read_curves(RunDir(run))], "loss")
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1] and line.get_marker() not in (None, "None", "") and line.get_markersize() > 0
    plt.close(fig)

    rows = "".join(f",{step},{1 / step}\n" for step in range(1, 101))
    (run / "metrics.csv").write_text("epoch,step,train/loss\n" + rows)
    fig, ax = plt.subplots()
    _draw(ax, [read_curves(RunDir(run))], "loss")
    assert ax.get_lines()[0].get_marker() in (None, "None", "")
    plt.close(fig)
