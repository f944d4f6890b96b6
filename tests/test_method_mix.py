"""Every method in METHODS goes through the after-training commands together: a sweep per method, one report over
all their runs (a panel per method, its own axis label), one comparison of their adapters (a column per run)."""

import csv
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import alignment  # noqa: E402
from alignment.commands.report import AXIS_LABELS, PLOTTED, metric_figure, read_curves  # noqa: E402
from alignment.methods import METHODS  # noqa: E402
from alignment.run.rundir import RunDir  # noqa: E402
from alignment.usage import main  # noqa: E402
from tests.helpers import write_jsonl  # noqa: E402

pytestmark = pytest.mark.xdist_group("method-mix")  # under pytest -n, one worker builds the sweeps these share


def demo_config(method: str) -> str:
    """Each method's offline demo config: configs/demo_<method>.yaml."""
    return f"demo_{method.lower()}.yaml"


def table_rows(path):
    with open(path) as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """One sweep per method (its own beta, 3 batches): {method: the sweep's directory}. Sweeps of several values
    are tests/test_sweep.py's; here each method goes through the sweep, report and compare commands."""
    root = tmp_path_factory.mktemp("sweeps")
    out = {}
    for method in METHODS:
        out[method] = root / method.lower()
        main(["sweep", "--config", demo_config(method), "--grid", "model.beta=0.1",
              "--grid", "trainer.max_epochs=1", "--out", str(out[method]), "--trainer.limit_train_batches", "3",
              "--trainer.limit_val_batches", "1"])  # fmt: skip
    return out


@pytest.mark.slow
def test_a_sweep_of_every_method_finishes_with_its_metrics_in_the_table(sweeps):
    for method, out in sweeps.items():
        rows = table_rows(out / "sweep.csv")
        assert [r["run"] for r in rows] == ["beta-0.1_max_epochs-1"], method
        assert {r["status"] for r in rows} == {"finished"}, method
        for row in rows:
            config = (out / row["run"] / "config.yaml").read_text()
            assert f"class_path: alignment.{method}\n" in config, method
            progress = f"val/{getattr(alignment, method).progress_metric}"  # SFT: mean_token_accuracy
            assert all(row[c] not in ("", "nan") for c in ("train/loss", progress)), (method, row)


@pytest.mark.slow
def test_one_report_over_every_method_gives_each_its_panel_and_row(sweeps, tmp_path):
    runs = {method: out / "beta-0.1_max_epochs-1" for method, out in sweeps.items()}
    main(["report", *map(str, runs.values()), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "beta-0.1" in line]
    assert len(rows) == len(METHODS)  # same-named runs: labelled by their sweep, i.e. by method
    assert [row.split("|")[1].strip() for row in rows] == [f"{m.lower()}/beta-0.1_max_epochs-1" for m in METHODS]

    curves = [read_curves(RunDir(run)) for run in runs.values()]
    assert [c.method for c in curves] == list(METHODS)
    for metric in PLOTTED:
        fig = metric_figure(curves, metric)
        shown = [ax for ax in fig.axes if ax.axison]
        assert [ax.get_title() for ax in shown] == [f"{metric} ({m})" for m in METHODS]
        for ax, method, run in zip(shown, METHODS, curves, strict=True):
            logged = metric in run.train and run.train[metric].notna().any()  # SFT logs no rewards
            assert len(ax.get_lines()) == (2 if logged else 0), (metric, method)  # its own run: train and val
            assert ax.get_ylabel() == AXIS_LABELS.get(method, {}).get(metric, ax.get_ylabel())
        plt.close(fig)
    losses = {method: labels["loss"] for method, labels in AXIS_LABELS.items()}
    assert set(METHODS) <= losses.keys() and len(set(losses.values())) == len(losses)  # each says what it sums


@pytest.mark.slow
def test_compare_puts_the_adapter_of_every_method_in_its_own_column(sweeps, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 + 3?"}, {"prompt": "Count to 3."}])
    names = [method.lower() for method in METHODS]
    runs = [out / "beta-0.1_max_epochs-1" for out in sweeps.values()]
    adapters = [f"--adapter={name}={run}" for name, run in zip(names, runs, strict=True)]
    main(["compare", "--prompts", str(prompts), *adapters, "--max-new-tokens", "6", "--out", str(tmp_path / "cmp")])
    records = [json.loads(line) for line in (tmp_path / "cmp" / "compare.jsonl").read_text().splitlines()]
    assert [list(r["answers"]) for r in records] == [["base", *names]] * 2
    table = [line for line in (tmp_path / "cmp" / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["#", "prompt", "base", *names]
    answers = {name: [r["answers"][name]["text"] for r in records] for name in ["base", *names]}
    assert len({tuple(a) for a in answers.values()}) > 1  # the columns hold different models' answers
