"""`python cli.py report RUN [RUN ...]`: curves of loss and rewards from metrics.csv, and a summary of final values."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alignment.errors import DataError
from alignment.rundir import RunDir, open_run
from alignment.tables import markdown_table

log = logging.getLogger(__name__)

PLOTTED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
OVERVIEW = "curves.png"


@dataclass(frozen=True)
class Curves:
    """One run's logged metrics: train rows and validation rows, each indexed by optimizer step."""

    label: str
    train: pd.DataFrame  # columns: the metric names without the "train/" prefix
    val: pd.DataFrame  # the same without "val/"

    def final(self, split: str, metric: str) -> float:
        """The last value logged for `split/metric`, NaN when it was never logged."""
        frame = self.train if split == "train" else self.val
        if metric not in frame:
            return math.nan
        values = frame[metric].dropna()
        return float(values.iloc[-1]) if len(values) else math.nan


def read_curves(run: RunDir, label: str | None = None) -> Curves:
    """Train and validation rows of RUN/metrics.csv.

    A step logged twice (a run resumed from a checkpoint before its last log) keeps its latest row.
    """
    if not run.metrics.is_file():
        raise DataError(f"{run.metrics} does not exist: {run.path} is not a run directory, or it logged nothing yet")
    try:
        table = pd.read_csv(run.metrics)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{run.metrics}: not a readable CSV file: {err}") from err
    if "step" not in table:
        raise DataError(f"{run.metrics}: no 'step' column; is it a Lightning CSVLogger file?")
    return Curves(label or run.name, _split_rows(table, "train"), _split_rows(table, "val"))


def _split_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    prefix = f"{split}/"
    columns = [c for c in table.columns if c.startswith(prefix)]
    if not columns:
        return pd.DataFrame()
    rows = table[["step", *columns]].dropna(subset=columns, how="all")
    rows = rows.drop_duplicates(subset="step", keep="last").set_index("step").sort_index()
    return rows.rename(columns=lambda c: c.removeprefix(prefix))


def run_labels(runs: list[RunDir]) -> list[str]:
    """Legend names: the run directory's name, with its parent in front when two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


# ---- plots ----------------------------------------------------------------------------------------------------


def _draw(ax, curves: list[Curves], metric: str) -> None:
    """Train as a line, validation as markers of the same colour, one colour per run."""
    for i, run in enumerate(curves):
        color = f"C{i % 10}"
        if metric in run.train and run.train[metric].notna().any():
            values = run.train[metric].dropna()
            ax.plot(values.index, values.to_numpy(), color=color, linewidth=1.4, label=f"{run.label} train")
        if metric in run.val and run.val[metric].notna().any():
            values = run.val[metric].dropna()
            ax.plot(values.index, values.to_numpy(), color=color, linestyle="none", marker="o",
                    markersize=6, markeredgecolor="black", label=f"{run.label} val")  # fmt: skip
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_metric(curves: list[Curves], metric: str, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, curves, metric)
    if ax.has_data():
        ax.legend(fontsize="small")
    path = out / f"{metric.replace('/', '_')}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overview(curves: list[Curves], out: Path) -> Path:
    """All plotted metrics on one figure (2 x 3), with one shared legend in the sixth panel."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, metric in zip(axes.flat, PLOTTED, strict=False):
        _draw(ax, curves, metric)
    legend_ax = axes.flat[-1]
    legend_ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        legend_ax.legend(handles, labels, loc="center", fontsize="medium")
    fig.tight_layout()
    path = out / OVERVIEW
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- summary --------------------------------------------------------------------------------------------------


def summary(curves: list[Curves], metrics: tuple[str, ...] = PLOTTED) -> str:
    """Markdown: one row per run, the last step and the final train and validation value of each metric."""
    header = ["run", "step"] + [f"{split}/{m}" for m in metrics for split in ("train", "val")]
    rows = []
    for run in curves:
        steps = [frame.index.max() for frame in (run.train, run.val) if len(frame)]
        rows.append(
            [run.label, int(max(steps)) if steps else None]
            + [run.final(split, m) for m in metrics for split in ("train", "val")]
        )
    return markdown_table(header, rows)


def write_report(paths: list[str | Path], out: str | Path | None = None) -> Path:
    """PNG per metric, the overview figure and report.md for the runs; returns the output directory.

    `out` defaults to `report/` beside the first run (runs/report for runs/dpo runs/orpo).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none is opened
    runs = [open_run(p) for p in paths]
    curves = [read_curves(run, label) for run, label in zip(runs, run_labels(runs), strict=True)]
    target = Path(out) if out is not None else runs[0].path.parent / "report"
    target.mkdir(parents=True, exist_ok=True)
    images = [plot_metric(curves, metric, target) for metric in PLOTTED]
    overview = plot_overview(curves, target)
    text = "# Training report\n\nFinal logged values (train: mean over the last logging interval; val: the last "
    text += "validation pass).\n\n" + summary(curves) + "\n"
    text += f"![all curves]({overview.name})\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    (target / "report.md").write_text(text)
    log.info("report written to %s (report.md, %s and %d plots)", target, overview.name, len(images))
    return target
