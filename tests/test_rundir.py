"""A run directory is never damaged: what the real `cli.py` does to it when a fit is refused, fails, is stopped, runs
twice, resumes, or runs out of disk, and what validate does to it (nothing)."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.errors import RunDirError
from alignment.hub.tiny import build_tiny_model
from alignment.run.resume import checkpoint_step
from alignment.run.rundir import LOCK_FILE, lock_run, release_runs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--config", "demo.yaml", "--trainer.enable_progress_bar", "false"]


def cli(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*prefix, sys.executable, str(ROOT / "cli.py"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run directory (the lock file aside) and a hash of its bytes."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def steps_with(run: Path, column: str) -> list[int]:
    return [int(row["step"]) for row in rows(run) if row.get(column)]


def step_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True)["global_step"])


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user mistake prints; no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished ORPO demo run of 3 steps (config.yaml, metrics.csv, checkpoints/, adapter/). Tests that may
    change it work on a copy."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = cli("fit", *DEMO, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture
def copy_of_finished(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "config.yaml").write_text((finished / "config.yaml").read_text().replace(str(finished), str(run)))
    return run


@pytest.mark.slow
def test_a_hub_config_on_a_local_file_holds_out_pairs_it_never_trains_on(tmp_path):
    run = tmp_path / "run"
    result = cli("fit", "--config", "dpo_tinyllama.yaml", "--model.base", str(build_tiny_model()),
                 "--data.path", "alignment/assets/demo_pairs.jsonl", "--trainer.max_steps", "1",
                 "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.limit_val_batches", "1",
                 "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--data.val_split 'test_prefs' ignored" in result.stderr
    sizes = {}
    for split in ("train", "validation"):
        line = next(line for line in result.stderr.splitlines() if f" {split}: " in line and " pairs;" in line)
        sizes[split] = int(line.split(f" {split}: ")[1].split(" pairs")[0])
    # the 175 pairs: val_fraction 0.1 held out, none of them trained on
    assert sizes == {"train": 175 - round(0.1 * 175), "validation": round(0.1 * 175)}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["val_split"] is None and saved["data"]["val_fraction"] == 0.1


@pytest.mark.slow
def test_validate_leaves_the_run_as_it_was_even_on_a_read_only_directory(finished, tmp_path):
    before = snapshot(finished)
    early = tmp_path / "early.ckpt"  # an earlier checkpoint: validating it once cut metrics.csv back to its step
    checkpoint = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save(checkpoint | {"global_step": 1}, early)
    read_only = ()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode == 0:  # as root, chmod would not stop a write: a read-only bind mount does
        mount = f'mount --bind {finished} {finished} && mount -o remount,bind,ro {finished} && exec "$@"'
        read_only = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh")
    result = cli("validate", "--config", str(finished / "config.yaml"), "--ckpt_path", str(early),
                 "--trainer.enable_progress_bar", "false", prefix=read_only)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/loss" in result.stdout and "Previous log files" not in result.stderr
    assert snapshot(finished) == before
    # the config is still one fit reads, and a run at the end of its schedule has nothing to resume
    result = cli("fit", "--config", str(finished / "config.yaml"), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"nothing to resume: {finished} finished at step 3" in result.stderr
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--model.beta", "0.2"], "model.beta: 0.1 in the checkpoint, 0.2 now"),
     (["--trainer.max_steps", "6"], "its learning-rate schedule is 3 optimizer steps long, this run's would be 6")],
)  # fmt: skip
@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_as_it_was(copy_of_finished, flags, message):
    run, before = copy_of_finished, snapshot(copy_of_finished)
    line = error_line(cli("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", *flags))
    assert "cannot resume" in line and message in line
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_rerun_needs_overwrite_and_nothing_goes_before_the_new_run_trains(copy_of_finished, tmp_path):
    run, before = copy_of_finished, snapshot(copy_of_finished)
    line = error_line(cli("fit", *DEMO, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2"))
    assert f"{run} already holds a run" in line and "--ckpt_path last" in line and "--overwrite true" in line
    assert snapshot(run) == before

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    line = error_line(cli("fit", *DEMO, "--trainer.default_root_dir", str(run), "--overwrite", "true",
                          "--data.path", str(bad)))  # fmt: skip
    assert "bad.jsonl" in line and "chosen" in line
    assert snapshot(run) == before  # a rerun that fails before training deletes nothing

    interrupted = start_cli("fit", *DEMO, "--trainer.default_root_dir", str(run), "--overwrite", "true")
    deadline = time.monotonic() + 120
    while str(interrupted.pid) not in (run / LOCK_FILE).read_text():  # it holds the directory, has not trained
        assert interrupted.poll() is None and time.monotonic() < deadline, "the fit did not start"
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGINT)  # Ctrl-C while it loads the model and tokenizes
    interrupted.communicate(timeout=120)
    assert snapshot(run) == before

    result = cli("fit", *DEMO, "--trainer.default_root_dir", str(run), "--overwrite", "true",
                 "--trainer.max_steps", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_with(run, "train/loss") == [2, 4]  # the demo logs every 2 steps
    # the earlier run's checkpoint at step 3 is gone, not left beside the new run's
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["overwrite"] is False and saved["ckpt_path"] is None


@pytest.mark.slow
def test_resume_without_a_checkpoint_or_from_a_damaged_one_is_refused(copy_of_finished, tmp_path):
    empty = tmp_path / "empty"
    line = error_line(cli("fit", *DEMO, "--trainer.default_root_dir", str(empty), "--ckpt_path", "last"))
    assert str(empty / "checkpoints" / "last.ckpt") in line and "does not exist" in line

    run = copy_of_finished
    last = run / "checkpoints" / "last.ckpt"
    other = run / "checkpoints" / "epoch=0-step=3.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    before = snapshot(run)
    line = error_line(cli("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    assert f"{last} is damaged" in line and f"--ckpt_path {other}" in line
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_second_fit_is_refused_at_once_and_a_signal_stops_without_validating(tmp_path):
    run = tmp_path / "run"
    args = ["fit", *DEMO, "--trainer.default_root_dir", str(run)]
    first = start_cli(*args, "--trainer.max_epochs", "1000")
    deadline = time.monotonic() + 180
    while not (run / "metrics.csv").exists() or "train/loss" not in (run / "metrics.csv").read_text():
        assert first.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)

    line = error_line(cli(*args, "--trainer.max_steps", "2"))
    assert f"{run} is in use by another fit (pid {first.pid})" in line

    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    stopped_at = step_of(run / "checkpoints" / "last.ckpt")
    assert f"stopped at step {stopped_at} (SIGTERM)" in stderr
    # the demo validates at each epoch's end (20 steps), logged at the epoch's step - 1: only the epochs finished
    # before the signal were validated; a stop on an epoch's last step (1 in 20) is the case that would show one more
    assert steps_with(run, "val/loss") == [20 * epoch - 1 for epoch in range(1, (stopped_at - 1) // 20 + 1)]


@pytest.mark.slow
def test_a_signal_on_an_epochs_last_step_stops_without_that_epochs_validation(tmp_path):
    run = tmp_path / "run"
    result = cli("fit", *DEMO, "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "3",
                 "--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=40")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped at step 40 (SIGTERM)" in result.stderr and step_of(run / "checkpoints" / "last.ckpt") == 40
    assert steps_with(run, "val/loss") == [19]  # the first epoch's; none for the second, which the signal ended


def test_the_lock_goes_with_the_process_that_held_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from alignment.run.rundir import lock_run; "
         f"lock = lock_run(Path({str(tmp_path)!r})); print('locked', flush=True); import time; time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=f"in use by another fit \\(pid {holder.pid}\\)"):
        lock_run(tmp_path)
    holder.kill()  # SIGKILL: no clean-up of its own
    holder.wait()
    lock_run(tmp_path).close()


def test_a_directory_only_the_lock_made_goes_on_release_and_any_other_stays(tmp_path):
    lock_run(tmp_path / "new" / "run")  # made by the lock, nothing written: a fit refused before it began
    release_runs()
    assert not (tmp_path / "new").exists()

    (tmp_path / "mine").mkdir()  # the user's directory
    lock_run(tmp_path / "mine")
    lock_run(tmp_path / "used" / "run")
    (tmp_path / "used" / "run" / "config.yaml").write_text("seed_everything: 42\n")  # the fit began
    release_runs()
    assert (tmp_path / "mine").is_dir() and (tmp_path / "used" / "run" / "config.yaml").is_file()


@pytest.mark.slow
def test_a_fit_in_the_same_process_may_use_the_directory_again_once_the_first_has_returned(tmp_path):
    from alignment.usage import main

    run = str(tmp_path / "run")
    main(["fit", *DEMO, "--trainer.default_root_dir", run, "--trainer.max_steps", "1"])
    main(["fit", *DEMO, "--trainer.default_root_dir", run, "--trainer.max_steps", "1", "--overwrite", "true"])
    assert step_of(tmp_path / "run" / "checkpoints" / "last.ckpt") == 1


@pytest.mark.slow
def test_a_full_disk_stops_in_one_line_with_adapter_and_checkpoint_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    env = {"PYTHONPATH": str(ROOT / "tests" / "diskfull"), "DISKFULL_DIR": str(run), "DISKFULL_AFTER_STEP": "3"}
    result = cli("fit", *DEMO, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4",
                 "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", env=env)  # fmt: skip
    line = error_line(result)
    assert "no space left on the device" in line and "--ckpt_path last" in line
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # saved after the validation at step 2; the one at step 4 failed
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(last["state_dict"])
    for key, value in last["state_dict"].items():  # PEFT's names drop "policy." and the adapter name
        assert torch.equal(adapter[key.removeprefix("policy.").replace(".default", "")], value), key
    assert not [p.name for p in run.rglob(".*") if p.name != LOCK_FILE]  # no temp file or directory left

    # once there is space again, the run continues from step 2 and its files agree
    result = cli("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Previous log files" not in result.stderr
    # none twice, none lost (Lightning logs a validation at step S - 1)
    assert steps_with(run, "train/loss") == [2, 4] and steps_with(run, "val/loss") == [1, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["ckpt_path"] is None  # not `last`
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert last["global_step"] == 4
    assert all(torch.equal(adapter[k.removeprefix("policy.").replace(".default", "")], v)
               for k, v in last["state_dict"].items())  # fmt: skip


def test_a_damaged_checkpoint_names_the_readable_one_beside_it_or_says_there_is_none(tmp_path):
    last, other = tmp_path / "last.ckpt", tmp_path / "epoch=0-step=4.ckpt"
    last.write_bytes(b"PK\x03\x04 cut short")
    other.write_bytes(b"not a checkpoint either")
    with pytest.raises(RunDirError, match="last.ckpt is damaged.*no other checkpoint in the directory"):
        checkpoint_step(last)
    torch.save({"global_step": 4}, other)
    with pytest.raises(RunDirError, match=r"epoch=0-step=4.ckpt \(step 4\) is readable"):
        checkpoint_step(last)
