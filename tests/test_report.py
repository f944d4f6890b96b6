"""`report`: one PNG per metric with train and validation of every run on the same axes, and report.md."""

import csv
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from alignment.cli import main  # noqa: E402
from alignment.errors import DataError  # noqa: E402
from alignment.report import PLOTTED, Curves, _draw, read_curves, run_labels  # noqa: E402
from alignment.rundir import RunDir  # noqa: E402
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
    assert list(curves.val.index) == [5] and curves.final("val", "loss") == 0.65
    assert math.isnan(curves.final("val", "rewards/chosen"))  # never logged


def test_default_output_is_beside_the_first_run_and_labels_tell_same_named_runs_apart(tmp_path):
    run = demo_run("orpo")
    main(["report", str(run)])
    assert (run.parent / "report" / "report.md").is_file()
    a, b = RunDir(tmp_path / "sweep1" / "run"), RunDir(tmp_path / "sweep2" / "run")
    assert run_labels([a, b]) == ["sweep1/run", "sweep2/run"]
    assert isinstance(read_curves(RunDir(run)), Curves)


def test_bad_runs_are_named_in_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert f"run directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metrics.csv does not exist"):
        read_curves(RunDir(tmp_path / "empty"))


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0 and "run directories" in capsys.readouterr().out
