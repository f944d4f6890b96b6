"""`python cli.py report RUN [RUN ...]`: curves of loss and rewards from metrics.csv, and a summary of final values."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alignment.commands.tables import markdown_table
from alignment.displacement import REFERENCE_METHODS, WINDOW, RewardPoint, displacement_spans
from alignment.errors import DataError
from alignment.run.rundir import RunDir, open_run

log = logging.getLogger(__name__)

PLOTTED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
OVERVIEW = "curves.png"
FEW_POINTS = 20  # a train series shorter than this gets a marker on each point: one point alone is no line
DISPLACED = "likelihood displacement"  # the label of the shaded region on the reward panels
# what each plotted metric measures, per method, as TRL logs it: DPO's rewards are beta * (policy - reference) of
# summed log-probs (Rafailov et al. 2023, sec. 5), its loss the chosen loss type's; ORPO's and SimPO's beta * the
# policy's mean log-prob, CPO's beta * its summed log-prob. ORPO's loss holds the chosen answer's NLL (Hong et al.
# 2024, eq. 6), CPO's too (Xu et al. 2024), so they sit far above DPO's (ln 2 at the start); SimPO's is
# -log sigmoid(margin - gamma) (Meng et al. 2024, eq. 6), plus the NLL when cpo_alpha > 0; KTO's is lambda times
# 1 - sigmoid(beta * log-ratio - z_0) for desirable answers (Ethayarajh et al. 2024, eq. 8); SFT logs no rewards
AXIS_LABELS = {
    "DPO": {"loss": "DPO loss", "rewards/chosen": "β·(log π − log π_ref), summed",
            "rewards/rejected": "β·(log π − log π_ref), summed", "rewards/margins": "chosen − rejected reward"},
    "ORPO": {"loss": "NLL + β·L_OR", "rewards/chosen": "β·mean log π", "rewards/rejected": "β·mean log π",
             "rewards/margins": "chosen − rejected reward"},
    "SimPO": {"loss": "−log σ(margin − γ) (+ α·NLL)", "rewards/chosen": "β·mean log π",
              "rewards/rejected": "β·mean log π", "rewards/margins": "chosen − rejected reward"},
    "CPO": {"loss": "−log σ(margin) + α·NLL", "rewards/chosen": "β·log π, summed",
            "rewards/rejected": "β·log π, summed", "rewards/margins": "chosen − rejected reward"},
    "KTO": {"loss": "λ·(1 − σ(β·log-ratio − z₀))", "rewards/chosen": "β·(log π − log π_ref), desirable",
            "rewards/rejected": "β·(log π − log π_ref), undesirable",
            "rewards/margins": "desirable − undesirable reward",
            "rewards/accuracies": "share on their label's side of z₀"},
    "SFT": {"loss": "NLL per answer token"},
}  # fmt: skip
GENERIC_LABELS = {"loss": "loss", "rewards/chosen": "reward", "rewards/rejected": "reward",
                  "rewards/margins": "reward margin",
                  "rewards/accuracies": "share of pairs, chosen > rejected"}  # fmt: skip


@dataclass(frozen=True)
class Curves:
    """One run's logged metrics: train rows and validation rows, each indexed by optimizer step."""

    label: str
    train: pd.DataFrame  # columns: the metric names without the "train/" prefix
    val: pd.DataFrame  # the same without "val/"
    method: str = ""  # the module's class name (a key of METHODS), "" when the run has no config

    def final(self, split: str, metric: str) -> float:
        """The last value logged for `split/metric`, NaN when it was never logged."""
        frame = self.train if split == "train" else self.val
        if metric not in frame:
            return math.nan
        values = frame[metric].dropna()
        return float(values.iloc[-1]) if len(values) else math.nan

    def displacement(self) -> list[tuple[int, int]]:
        """The stretches of steps where the train rewards show likelihood displacement (`displacement_spans`); none
        for a method whose rewards are not measured against a reference (their rewards/chosen is always below 0)."""
        if self.method not in REFERENCE_METHODS or not {"rewards/chosen", "rewards/margins"} <= set(self.train):
            return []
        rows = self.train[["rewards/chosen", "rewards/margins"]].dropna()
        return displacement_spans([RewardPoint(int(s), float(c), float(m)) for s, (c, m) in zip(
            rows.index, rows.to_numpy(), strict=True)])  # fmt: skip


def read_curves(run: RunDir, label: str | None = None) -> Curves:
    """Train and validation rows of RUN/metrics.csv, both indexed by the number of optimizer steps done.

    A train row at step k is the mean over the steps up to the k-th. Lightning runs validation after the k-th step
    but logs it with its count of steps before adding that step (`_batches_that_stepped`, raised after the
    validation loop in `_TrainingEpochLoop.on_advance_end`): a validation row logged at step k - 1 is moved to k.
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
    val = _split_rows(table, "val")
    val.index = val.index + 1
    class_path = str((run.config().get("model") or {}).get("class_path") or "")
    return Curves(label or run.name, _split_rows(table, "train"), val, class_path.rsplit(".", 1)[-1])


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


def method_groups(curves: list[Curves]) -> dict[str, list[int]]:
    """The runs' positions per method, in order of first appearance: runs of one method share a panel, runs of
    different methods do not (their losses and rewards measure different things, on different scales)."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(curves):
        groups.setdefault(run.method, []).append(i)
    return groups


def axis_label(method: str, metric: str) -> str:
    return AXIS_LABELS.get(method, {}).get(metric, GENERIC_LABELS.get(metric, metric))


def _draw(ax, curves: list[Curves], metric: str, colors: list[int] | None = None) -> None:
    """Train as a line, validation as markers of the same colour, one colour per run (`colors`: each run's colour
    number, so that a run keeps its colour in every panel)."""
    colors = colors if colors is not None else list(range(len(curves)))
    methods = {run.method for run in curves}
    for i, run in zip(colors, curves, strict=True):
        color = f"C{i % 10}"
        if metric in run.train and run.train[metric].notna().any():
            values = run.train[metric].dropna()
            marker = "o" if len(values) < FEW_POINTS else None
            ax.plot(values.index, values.to_numpy(), color=color, linewidth=1.4, marker=marker, markersize=3,
                    label=f"{run.label} train")  # fmt: skip
            if metric.startswith("rewards/"):
                for start, end in run.displacement():
                    ax.axvspan(start, end, color=color, alpha=0.12, hatch="//", linewidth=0,
                               label=f"{run.label}: {DISPLACED}")  # fmt: skip
        if metric in run.val and run.val[metric].notna().any():
            values = run.val[metric].dropna()
            ax.plot(values.index, values.to_numpy(), color=color, linestyle="none", marker="o",
                    markersize=6, markeredgecolor="black", label=f"{run.label} val")  # fmt: skip
    method = methods.pop() if len(methods) == 1 else ""
    if not ax.has_data():  # e.g. SFT, which has no rewards
        ax.text(0.5, 0.5, f"not logged by {method or 'these runs'}", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{metric} ({method})" if method else metric)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(axis_label(method, metric))
    ax.grid(alpha=0.3)


def metric_figure(curves: list[Curves], metric: str):
    """One panel per method, side by side, each with its own y axis."""
    import matplotlib.pyplot as plt

    groups = method_groups(curves)
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False)
    for ax, members in zip(axes[0], groups.values(), strict=True):
        _draw(ax, [curves[i] for i in members], metric, members)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_metric(curves: list[Curves], metric: str, out: Path) -> Path:
    return _save(metric_figure(curves, metric), out / f"{metric.replace('/', '_')}.png", dpi=110)


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def overview_figure(curves: list[Curves]):
    """All plotted metrics on one figure: for one method 2 x 3 panels, the sixth holding the legend; for several
    one row per method, its legend in the row's last panel."""
    import matplotlib.pyplot as plt

    groups = method_groups(curves)
    shape = (2, 3) if len(groups) == 1 else (len(groups), len(PLOTTED) + 1)
    widths = [1.0] * shape[1] if len(groups) == 1 else [1.0] * len(PLOTTED) + [0.5]  # a narrow legend column
    fig, axes = plt.subplots(*shape, figsize=(sum(widths) * 5, 4 * shape[0]), squeeze=False,
                             gridspec_kw={"width_ratios": widths})  # fmt: skip
    rows = [axes.flat] if len(groups) == 1 else list(axes)
    for panels, members in zip(rows, groups.values(), strict=True):
        panels = list(panels)
        for ax, metric in zip(panels, PLOTTED, strict=False):
            _draw(ax, [curves[i] for i in members], metric, members)
        panels[-1].axis("off")
        handles, labels = panels[0].get_legend_handles_labels()
        if handles:
            panels[-1].legend(handles, labels, loc="center", fontsize="medium")
    fig.tight_layout()
    return fig


def plot_overview(curves: list[Curves], out: Path) -> Path:
    return _save(overview_figure(curves), out / OVERVIEW, dpi=100)


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


def displacement_note(curves: list[Curves]) -> str:
    """Markdown: the runs whose train rewards show likelihood displacement, and where; "" when no run has rewards
    measured against a reference (DPO, KTO)."""
    checked = [run for run in curves if run.method in REFERENCE_METHODS and "rewards/chosen" in run.train]
    if not checked:
        return ""
    found = [(run.label, spans) for run in checked if (spans := run.displacement())]
    text = (f"Likelihood displacement (rewards/chosen below 0 and falling while rewards/margins rise, over {WINDOW} "
            "train logs in a row; shaded on the reward curves): ")  # fmt: skip
    if not found:
        return text + f"none of the runs ({', '.join(run.label for run in checked)}).\n"
    where = "; ".join(f"{label}: " + ", ".join(f"from step {a} to {b}" for a, b in spans) for label, spans in found)
    return (text + where + ". The policy finds the chosen answers less likely than the reference does, while the "
            "margin grows (Razin et al. 2024); to keep them likely: --model.rpo_alpha (DPO), a lower learning rate "
            "or fewer epochs.\n")  # fmt: skip


def runs_with_metrics(paths: list[str | Path]) -> list[RunDir]:
    """The paths that are run directories (they hold metrics.csv); the others are skipped with a note, so that
    `report runs/*` passes over report/ or a sweep's directory. A DataError when none is a run."""
    runs, skipped = [], []
    for path in paths:
        run = RunDir(Path(path))
        if not run.path.exists():
            open_run(path)  # a mistyped path: the error names it
        (runs if run.metrics.is_file() else skipped).append(run)
    if skipped:
        log.info("skipped (no metrics.csv, not a run): %s", ", ".join(str(r.path) for r in skipped))
    if not runs:
        raise DataError(f"none of {', '.join(str(p) for p in paths)} is a run directory (none holds metrics.csv)")
    return runs


def write_report(paths: list[str | Path], out: str | Path | None = None) -> Path:
    """PNG per metric, the overview figure and report.md for the runs; returns the output directory.

    `out` defaults to `report/` beside the first run (runs/report for runs/dpo runs/orpo).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none is opened
    runs = runs_with_metrics(paths)
    curves = [read_curves(run, label) for run, label in zip(runs, run_labels(runs), strict=True)]
    target = Path(out) if out is not None else runs[0].path.parent / "report"
    target.mkdir(parents=True, exist_ok=True)
    images = [plot_metric(curves, metric, target) for metric in PLOTTED]
    overview = plot_overview(curves, target)
    text = "# Training report\n\nFinal logged values (train: mean over the last logging interval; val: the last "
    text += "validation pass).\n\n" + summary(curves) + "\n"
    note = displacement_note(curves)
    text += f"{note}\n" if note else ""
    text += f"![all curves]({overview.name})\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    (target / "report.md").write_text(text)
    log.info("report written to %s (report.md, %s and %d plots)", target, overview.name, len(images))
    return target
