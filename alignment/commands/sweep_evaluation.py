"""`sweep --evaluate PROMPTS --judge J [--pairs F]`: after the fits, one `evaluate` of the base and every finished
run's adapter (one base in memory), and per run its win-rate against the base (and its preference accuracy on
--pairs) as columns of the sweep's table.

The evaluation's files are those of `evaluate`, under `<sweep dir>/evaluate/` (one folder per base when the grid
varies the base: `<sweep dir>/evaluate/base-<name>_.../`, named after the base and its loading). Answers are cached
by the adapter's files and judgements by what the judge read, so a rerun of the sweep generates and judges only
what a new or retrained run adds. Every figure of the table is read back from that evaluation's evaluate.jsonl.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.commands.tables import BASE
from alignment.errors import ConfigError, DataError
from alignment.judging import percent
from alignment.run.rundir import RunDir

EVALUATE_DIR = "evaluate"
WIN_COLUMNS = ("vs_base/win_rate", "vs_base/win_rate_low", "vs_base/win_rate_high",
               "vs_base/wins", "vs_base/ties", "vs_base/losses")  # fmt: skip
PAIRS_COLUMNS = ("preference_accuracy", "preference_accuracy_low", "preference_accuracy_high")


@dataclass
class SweepEvaluation:
    """What `evaluate` is given (its keywords, less the models and --out), and what it found per run directory."""

    settings: dict[str, Any]  # run_evaluate's keywords: prompts, judge, pairs, decode, ...
    values: dict[Path, dict[str, Any]] = field(default_factory=dict)  # run directory -> column -> value
    notes: list[str] = field(default_factory=list)  # lines for sweep.md: where the evaluation is, the base's figures

    @property
    def columns(self) -> list[str]:
        return [*WIN_COLUMNS, *(PAIRS_COLUMNS if self.settings.get("pairs") else ())]

    def cells(self, run_path: Path) -> list[Any]:
        """The run's values, empty where it was not evaluated (not finished, or the sweep stopped)."""
        found = self.values.get(run_path, {})
        return [found.get(column) for column in self.columns]


def check_evaluation(settings: dict[str, Any]) -> None:
    """The mistakes seen before anything trains, each one line naming its flag."""
    for flag, key in (("--evaluate", "prompts"), ("--pairs", "pairs"), ("--judge-template", "judge_template")):
        if settings.get(key) is not None and not Path(settings[key]).is_file():
            raise ConfigError(f"{flag} {settings[key]}: no such file")
    if settings.get("judge") is None:
        raise ConfigError("--evaluate: win-rates against the base need a --judge (a hub name, a directory, a .gguf "
                          "file, smollm2-135m-instruct)")  # fmt: skip
    if not 0 <= settings.get("tie_margin", 0.05) < 0.5:
        raise ConfigError(f"--tie-margin must be within [0, 0.5), got {settings['tie_margin']}")
    for flag, key, least in (("--batch-size", "batch_size", 1), ("--max-length", "max_length", 2)):
        if settings.get(key, least) < least:
            raise ConfigError(f"{flag} must be >= {least}, got {settings[key]}")
    decode = settings.get("decode")
    if decode is not None and decode.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {decode.max_new_tokens}")
    from alignment.commands.compare import read_prompts  # a prompts file that holds none fails here, not after

    try:
        read_prompts(settings["prompts"], settings.get("prompt_field") or "prompt")
    except DataError as err:
        raise ConfigError(f"--evaluate {settings['prompts']}: {err}") from None


def adapter_names(paths: list[Path]) -> dict[Path, str]:
    """The name `evaluate` gives each run: its directory's name with every character an adapter name may not hold
    ('.', as in `beta-0.05`) written '-', and a number appended where two would meet."""
    names: dict[Path, str] = {}
    for i, path in enumerate(paths):
        name = re.sub(r"[^A-Za-z0-9_-]", "-", path.name)
        names[path] = name if name not in names.values() and name != BASE else f"{name}-{i}"
    return names


def evaluate_runs(evaluation: SweepEvaluation, run_paths: list[Path], target: Path,
                  run_name: Callable[[dict[str, str]], str]) -> None:  # fmt: skip
    """One evaluation per base the finished runs were trained on (one for a grid that keeps the base; several are
    named by `run_name` of their base's settings, as the sweep names its runs), then each run's figures against
    that base into `evaluation.values`."""
    from alignment.commands.evaluate import run_evaluate

    groups: dict[tuple, list[Path]] = {}
    for path in run_paths:
        trained = RunDir(path).model_args()
        key = (trained.get("base"), trained.get("revision"), trained.get("load_in_4bit"))
        groups.setdefault(key, []).append(path)
    for (base, revision, in_4bit), paths in groups.items():
        values = {"base": base, "revision": revision, "load_in_4bit": in_4bit}
        folder = target / EVALUATE_DIR
        if len(groups) > 1:
            folder /= run_name({k: str(v) for k, v in values.items() if v is not None})
        names = adapter_names(paths)
        run_evaluate(adapters=[f"{names[p]}={p}" for p in paths], out=folder, **evaluation.settings)
        read_figures(evaluation, folder, names)


def read_figures(evaluation: SweepEvaluation, folder: Path, names: dict[Path, str]) -> None:
    """Each run's win share against the base (Wilson 95% interval, ties counted apart) and preference accuracy, as
    evaluate.jsonl in `folder` has them, with the folder and the name the run has there."""
    from alignment.commands.evaluate_tables import read_records, summarize

    summary = summarize(read_records(folder))
    rows = {row["model"]: row for row in summary.rows()}
    for path, name in names.items():
        versus = summary.against(name, BASE)
        found: dict[str, Any] = dict(zip(WIN_COLUMNS, (*versus.share("win"), versus.wins, versus.ties,
                                                       versus.losses), strict=True))  # fmt: skip
        if evaluation.settings.get("pairs"):
            found.update((column, rows[name].get(column)) for column in PAIRS_COLUMNS)
        evaluation.values[path] = {"evaluate_dir": str(folder), "model": name, **found}
    base = rows.get(BASE, {})
    accuracy = [base.get(column) for column in PAIRS_COLUMNS]
    evaluation.notes.append(
        f"Against the base: {folder}/evaluate.md (judge {summary.settings.get('judge')})"
        + (f"; the base's preference accuracy {percent(*accuracy)}." if None not in accuracy else ".")
    )
