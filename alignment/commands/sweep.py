"""`python cli.py sweep --config X --grid model.beta=0.05,0.1 --grid trainer.max_epochs=1,3`.

Every combination is an ordinary `fit` in its own run directory, `<sweep dir>/<name from the values>`, so
whatever a fit reuses (the reference log-prob cache) a sweep reuses too. Each fit runs in a child process:
a crash, an out-of-memory error or a leaked CUDA allocation stays in that run and the next one starts clean,
with nothing (seeds, loggers, W&B runs) carried over from the previous one in memory.

A run is finished when its child exited with 0 (recorded in RUN/sweep.json with the exact fit arguments and
the config's content hash), RUN holds adapter/ and checkpoints/last.ckpt, and that checkpoint reached the end of
its schedule: a rerun of the sweep skips it. A fit stopped by SIGTERM or Ctrl-C also exits with 0, at the step it
saved: that run is recorded "interrupted at step S of N". A run that was interrupted or failed with the same
arguments resumes from its last.ckpt (`--ckpt_path last`, which the run's checkpoints make exact); one whose
arguments or config changed starts over.

SIGTERM or Ctrl-C to the sweep goes to the fit running (in its own process group, so that a terminal's Ctrl-C
reaches it once, through the sweep), which saves and stops; the sweep then records it, writes the table and stops
too, with status 0 as a fit does. A fit also gets SIGTERM when the sweep dies without a word (SIGKILL, Linux).

With `--evaluate PROMPTS --judge J`, the finished runs are then evaluated against their base
(`sweep_evaluation.py`): the table gains each run's win-rate against the base, and RUN/sweep.json its figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from alignment.commands.report import read_curves
from alignment.commands.sweep_evaluation import SweepEvaluation, check_evaluation, evaluate_runs
from alignment.commands.tables import markdown_table, write_csv
from alignment.errors import ConfigError, DataError
from alignment.files import ADAPTER_CONFIG
from alignment.run.rundir import RunDir

log = logging.getLogger(__name__)

MARKER = "sweep.json"
# blank where a method logs no such metric (SFT: no rewards; the others: no token accuracy)
TABLE_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "loss", "mean_token_accuracy"
)  # fmt: skip
RESERVED = ("trainer.default_root_dir", "ckpt_path")  # the sweep sets these itself


@dataclass(frozen=True)
class Axis:
    key: str  # a fit flag without its dashes, e.g. "model.beta"
    values: list[str]


def parse_grid(specs: list[str]) -> list[Axis]:
    """`KEY=V1,V2,...` per spec; commas inside [...] or {...} belong to the value (`[q_proj,v_proj]`)."""
    axes: list[Axis] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().removeprefix("--")
        values = _split_values(text)
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not values or any(not v for v in values):
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,... e.g. --grid model.beta=0.05,0.1")
        if key in RESERVED:
            raise ConfigError(f"--grid {spec!r}: the sweep sets {key} itself (the sweep directory is --out)")
        if key in (a.key for a in axes):
            raise ConfigError(f"--grid {spec!r}: {key} is given twice; list all its values in one --grid")
        axes.append(Axis(key, values))
    return axes


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return values + [current.strip()] if text.strip() else []


def combinations(axes: list[Axis]) -> list[dict[str, str]]:
    """Every combination, the last axis varying fastest."""
    return [
        dict(zip([a.key for a in axes], values, strict=True)) for values in itertools.product(*(a.values for a in axes))
    ]


SAFE_VALUE = re.compile(r"[A-Za-z0-9.-]+")  # kept as written in a run name; "_" separates the name's parts


def run_name(values: dict[str, str]) -> str:
    """`beta-0.05_max_epochs-1`: each key's last part (the whole key where two share it), then the value.

    A value made only of letters, digits, '.' and '-' is written as it is (`-1` gives `seed--1`); any other value
    has its other characters replaced by '-' and a hash of the whole value appended, so `a b`, `a_b` and `a-b` get
    three names, and the same values give the same name in every invocation.
    """
    last = [key.rsplit(".", 1)[-1] for key in values]
    parts = []
    for (key, value), short in zip(values.items(), last, strict=True):
        name = short if last.count(short) == 1 else key
        parts.append(f"{name}-{_value_text(value)}")
    return "_".join(parts)


def _value_text(value: str) -> str:
    if SAFE_VALUE.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9.-]+", "-", value).strip("-")[:40]
    return f"{readable}-{digest}" if readable else digest


def check_settings(config: str, fit_args: list[str], combos: list[dict[str, str]]) -> None:
    """Parse each value of each key with the fit parser before anything trains: an unknown key or a value of the
    wrong type fails here, naming the --grid key, instead of in the middle of the sweep."""
    from alignment.run.cli import run_cli

    for flag in fit_args:
        if flag.removeprefix("--").split("=", 1)[0] in RESERVED:
            raise ConfigError(f"{flag}: the sweep sets this itself for each run (the sweep directory is --out)")
    seen: set[tuple[str, str]] = set()
    for combo in combos:
        changed = [item for item in combo.items() if item not in seen]
        if not changed:  # every value here already parsed in an earlier combination
            continue
        seen.update(changed)
        errors = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
                run_cli(["fit", "--config", config, *fit_args, *_flags(combo), "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                message = errors.getvalue()
                message = " ".join(message[message.find("error:") :].removeprefix("error:").split())[:400]
                raise ConfigError(f"--grid {', '.join(f'{k}={v}' for k, v in changed)}: {message}") from None


def _flags(combo: dict[str, str]) -> list[str]:
    return [item for key, value in combo.items() for item in (f"--{key}", value)]


# ---- running ------------------------------------------------------------------------------------------------


@dataclass
class SweepRun:
    values: dict[str, str]
    path: Path
    args: list[str]  # the fit arguments, without --ckpt_path
    status: str = "pending"


def _config_hash(config: str) -> str:
    """The config's content with that of the files its groups name (`trainer: shared/trainer_gpu.yaml`): a change
    to a shared file changes every run that reads it."""
    digest = hashlib.sha256(Path(config).read_bytes())
    try:
        groups = yaml.safe_load(Path(config).read_text())
    except yaml.YAMLError:  # the fit says what is wrong with it
        groups = None
    for value in groups.values() if isinstance(groups, dict) else []:
        if isinstance(value, str) and (Path(config).parent / value).is_file():
            digest.update((Path(config).parent / value).read_bytes())
    return digest.hexdigest()


def _read_marker(run: SweepRun) -> dict:
    try:
        return json.loads((run.path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_marker(run: SweepRun, config_hash: str, status: str) -> None:
    record = {"values": run.values, "args": run.args, "config_sha256": config_hash, "status": status}
    (run.path / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def is_finished(run: SweepRun, config_hash: str) -> bool:
    """The child exited 0 with these exact arguments and config, and left an adapter and a last checkpoint at the
    end of its schedule (a sweep before this check recorded a fit stopped by a signal as finished)."""
    marker = _read_marker(run)
    same = marker.get("args") == run.args and marker.get("config_sha256") == config_hash
    files = (run.path / "adapter" / ADAPTER_CONFIG).is_file() and RunDir(run.path).last_checkpoint.is_file()
    return same and marker.get("status") == "finished" and files and not unfinished_step(run)


def unfinished_step(run: SweepRun) -> str | None:
    """`step S of N` when the run's last.ckpt stopped before the end of its schedule, else None (at the end, or
    nothing to tell: no checkpoint, or one without the schedule's length)."""
    import torch  # only when a run is looked at: the sweep's own flags answer without torch

    from alignment.run.callbacks import RunCheckpoint

    try:  # mmap: the few bytes of the step, not the adapters and optimizer state
        checkpoint = torch.load(RunDir(run.path).last_checkpoint, map_location="cpu", weights_only=True, mmap=True)
        step, total = checkpoint["global_step"], (checkpoint.get(RunCheckpoint.SCHEDULE_KEY) or {})["total_steps"]
    except Exception:  # missing, damaged, or older than the schedule's record: the fit's resume says what it is
        return None
    return f"step {int(step)} of {int(total)}" if int(step) < int(total) else None


def _can_resume(run: SweepRun, config_hash: str) -> bool:
    marker = _read_marker(run)
    same = marker.get("args") == run.args and marker.get("config_sha256") == config_hash
    return same and RunDir(run.path).last_checkpoint.is_file()


def fit_in_child(run: SweepRun, config_hash: str) -> tuple[str, list[str]]:
    """Run the fit in a child process, its output in RUN/fit.log; returns its status (`finished`, `interrupted at
    step S of N`, `failed (exit C)`) and the signals the sweep received meanwhile (passed on to the fit)."""
    resume = _can_resume(run, config_hash)
    run.path.mkdir(parents=True, exist_ok=True)
    _write_marker(run, config_hash, "running")
    command = [sys.executable, "-c", "from alignment.usage import main; main()", *run.args]
    # a run whose arguments or config changed, or that stopped before its first checkpoint, starts over
    command += ["--ckpt_path", "last"] if resume else ["--overwrite", "true"]
    env = os.environ.copy()  # the child imports this same package, wherever the sweep is started from
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    with open(run.path / "fit.log", "a" if resume else "w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, process_group=0,
                                 preexec_fn=_die_with_parent())  # fmt: skip
        with forward_signals(child) as received:
            code = child.wait()
    stopped = unfinished_step(run) if code == 0 else None
    status = "finished" if code == 0 else f"failed (exit {code})"
    status = f"interrupted at {stopped}" if stopped else status
    _write_marker(run, config_hash, status)
    return status, received


@contextlib.contextmanager
def forward_signals(child: subprocess.Popen):
    """SIGINT and SIGTERM to the sweep go to the fit (which saves at the end of its step and exits), once each: a
    second one stops it at once, as it would a fit run alone. Yields the names of the signals received."""
    received: list[str] = []

    def forward(signum: int, frame) -> None:
        received.append(signal.Signals(signum).name)
        child.send_signal(signum)

    if threading.current_thread() is not threading.main_thread():  # Python lets the main thread alone set them
        yield received
        return
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_with_parent():
    """The function the child runs before the fit starts: SIGTERM when the sweep dies (Linux's PR_SET_PDEATHSIG),
    so that a sweep killed outright leaves no fit training on its own. libc's prctl is looked up here, in the parent:
    the child, between fork and exec, only calls it (no dlopen there). None elsewhere than Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def die_with_parent() -> None:
        prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG

    return die_with_parent


def final_values(run: SweepRun) -> list[float | None]:
    """Final train and val value of each table metric (empty when the run logged nothing)."""
    try:
        curves = read_curves(RunDir(run.path))
    except DataError:
        return [None] * (2 * len(TABLE_METRICS))
    return [curves.final(split, metric) for metric in TABLE_METRICS for split in ("train", "val")]


def write_table(
    runs: list[SweepRun], keys: list[str], target: Path, evaluation: SweepEvaluation | None = None
) -> tuple[Path, Path]:
    """sweep.md and sweep.csv: a row per run, its values, status and final metrics (and with `evaluation`, its
    figures against the base, empty for a run not evaluated)."""
    header = ["run", *keys, "status"] + [f"{split}/{m}" for m in TABLE_METRICS for split in ("train", "val")]
    rows = [[r.path.name, *(r.values[k] for k in keys), r.status, *final_values(r)] for r in runs]
    notes = ""
    if evaluation is not None:
        header += evaluation.columns
        rows = [row + evaluation.cells(r.path) for row, r in zip(rows, runs, strict=True)]
        notes = "".join(f"{line}\n\n" for line in evaluation.notes)
    markdown, table = target / "sweep.md", target / "sweep.csv"
    markdown.write_text(f"# Sweep\n\nFinal logged values per run (run directories under {target}).\n\n{notes}"
                        + markdown_table(header, rows))  # fmt: skip
    write_csv(table, header, rows)
    return markdown, table


def check_run_dirs(runs: list[SweepRun]) -> None:
    """Before anything trains: every combination has its own directory, and none is taken by something else
    (a run of other values, or a directory this sweep did not make), so no run can overwrite another."""
    seen: dict[Path, dict[str, str]] = {}
    for run in runs:
        if run.path in seen:
            raise ConfigError(f"--grid: {seen[run.path]} and {run.values} would share the run directory {run.path}")
        seen[run.path] = run.values
        if not run.path.exists() or (run.path.is_dir() and not any(run.path.iterdir())):
            continue
        recorded = _read_marker(run).get("values")
        if recorded != run.values:
            owner = f"the sweep run of {recorded}" if recorded else "something that is not a run of this sweep"
            raise ConfigError(f"{run.path} holds {owner}; the run of {run.values} would overwrite it: "
                              "choose another --out or move it away")  # fmt: skip


def run_sweep(
    config: str,
    grid: list[str],
    *,
    fit_args: list[str] | None = None,
    out: str | Path | None = None,
    evaluate: dict[str, Any] | None = None,
) -> Path:
    """Fit every combination in turn (finished ones skipped), then write sweep.md and sweep.csv; returns the table.
    `evaluate`: run_evaluate's keywords (prompts, judge, ...) to evaluate the finished runs against the base.

    Exits with code 1 after writing the table when a run failed (its output is in RUN/fit.log).
    """
    fit_args = list(fit_args or [])
    if not Path(config).is_file():
        raise ConfigError(f"--config {config}: no such file")
    evaluation = SweepEvaluation(evaluate) if evaluate is not None else None
    if evaluation is not None:
        check_evaluation(evaluation.settings)
    axes = parse_grid(grid)
    combos = combinations(axes)
    check_settings(config, fit_args, combos)
    target = Path(out) if out is not None else Path("runs") / f"{Path(config).stem}-sweep"
    names = [run_name(c) for c in combos]
    config_hash = _config_hash(config)
    runs = [
        SweepRun(combo, target / name, ["fit", "--config", config, *fit_args, *_flags(combo),
                 "--trainer.default_root_dir", str(target / name), "--trainer.enable_progress_bar", "false"])
        for combo, name in zip(combos, names, strict=True)
    ]  # fmt: skip
    check_run_dirs(runs)
    target.mkdir(parents=True, exist_ok=True)
    keys = [a.key for a in axes]
    received: list[str] = []
    with tqdm(runs, desc="sweep", unit="run") as progress:
        for run in progress:
            progress.set_postfix(run=run.path.name)
            if is_finished(run, config_hash):
                run.status = "finished (earlier)"
                continue
            status, received = fit_in_child(run, config_hash)
            run.status = f"{status[:-1]}, see fit.log)" if status.startswith("failed") else status
            progress.write(f"{run.path}: {run.status}")
            write_table(runs, keys, target, evaluation)  # partial results readable while the sweep goes on
            if received:
                break
    markdown, _ = write_table(runs, keys, target, evaluation)
    finished = [r for r in runs if r.status.startswith("finished")]
    if evaluation is not None and finished and not received:
        evaluate_runs(evaluation, [r.path for r in finished], target, run_name)
        for run in finished:  # RUN/sweep.json keeps the run's latest figures against the base
            record = _read_marker(run) | {"evaluation": evaluation.values[run.path]}
            (run.path / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        write_table(runs, keys, target, evaluation)
    log.info("sweep table written to %s and %s", markdown, markdown.with_suffix(".csv"))
    if received:  # pre-empted, as a fit: status 0
        left = ", ".join(f"{r.path.name} {r.status}" for r in runs if not r.status.startswith("finished"))
        log.warning("sweep stopped by %s: %s; run the same command again to continue", received[0], left)
        return markdown
    failed = [r.path.name for r in runs if r.status.startswith("failed")]
    stopped = [r.path.name for r in runs if r.status.startswith("interrupted")]
    if failed or stopped:
        log.error(
            "of %d runs, %d failed %s, %d were interrupted %s (each run's output is in its fit.log); run the same "
            "command again to continue them", len(runs), len(failed), failed, len(stopped), stopped,
        )  # fmt: skip
        sys.exit(1)
    return markdown
