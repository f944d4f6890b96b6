"""A run directory: as the after-training commands read it, and what a fit may do to it (lock it, start it over,
replace its adapter)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from alignment.errors import ConfigError, RunDirError
from alignment.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG, check_safetensors, share_like_plain_writes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    """`runs/<name>/`: config.yaml (resolved LightningCLI config), adapter/ (PEFT), metrics.csv, checkpoints/."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.ckpt"

    def config(self) -> dict[str, Any]:
        """The resolved config the run was trained with ({} when the directory has none)."""
        file = self.path / RUN_CONFIG
        if not file.is_file():
            return {}
        try:
            return yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not readable YAML: {err}") from err

    def model_args(self) -> dict[str, Any]:
        """`model.init_args` of the run's config: base, revision, load_in_4bit, ..."""
        return dict((self.config().get("model") or {}).get("init_args") or {})


def open_run(path: str | Path) -> RunDir:
    """A run directory that exists, or a ConfigError naming the path."""
    run = RunDir(Path(path))
    if not run.path.is_dir():
        raise ConfigError(f"run directory {run.path} does not exist")
    return run


def adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter of a run directory (RUN/adapter), or `path` itself when it is an adapter directory."""
    given = Path(path)
    if (given / ADAPTER_CONFIG).is_file():
        check_adapter_weights(given)
        return given
    run = open_run(given)
    if not (run.adapter / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"{run.path} holds no adapter ({run.adapter / ADAPTER_CONFIG} is missing): the run has not finished "
            "training, or it is not a run directory"
        )
    check_adapter_weights(run.adapter)
    return run.adapter


def check_adapter_weights(adapter: Path) -> None:
    """A ModelLoadError naming the adapter's safetensors file when it is cut short or otherwise damaged."""
    weights = adapter / ADAPTER_WEIGHTS[0]
    if weights.is_file():
        check_safetensors(weights, "copy the adapter again from where it came from, or train it again")


def run_of_adapter(adapter: Path) -> RunDir | None:
    """The run an adapter directory was exported by (its parent, when that holds a config.yaml)."""
    parent = RunDir(adapter.parent)
    return parent if (parent.path / RUN_CONFIG).is_file() else None


def base_of(adapter: Path, base: str | None, revision: str | None) -> tuple[str, str | None, dict[str, Any]]:
    """(base, revision, the run's model.init_args): what is given, else what the adapter's run was trained on."""
    run = run_of_adapter(adapter)
    trained = run.model_args() if run else {}
    if base is None and trained.get("base") is None:
        raise ConfigError(f"--base is needed: {adapter.parent} has no config.yaml naming the run's base")
    base = base or trained["base"]
    if revision is None and base == trained.get("base"):
        revision = trained.get("revision")
    return base, revision, trained


# ---- what a fit does to its run directory ------------------------------------------------------------------------

LOCK_FILE = "fit.lock"
RUN_FILES = (RUN_CONFIG, "metrics.csv", "hparams.yaml", "adapter")  # a run's own files, beside checkpoints/*.ckpt


def holds_run(path: Path) -> bool:
    """Whether a fit has trained in `path`: it left a config, metrics, an adapter or a checkpoint."""
    run_files = any((path / name).exists() for name in RUN_FILES)
    return run_files or any((path / "checkpoints").glob("*.ckpt"))


_held: list[tuple[IO[str], list[Path]]] = []  # this process's locks and the directories each lock made


def lock_run(path: Path) -> IO[str]:
    """Hold `path` for this fit until `release_runs` or the process ends (a crash or a kill too: the OS drops the
    lock); a second fit into it is refused at once."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(
            f"{path} is in use by another fit (pid {pid}): wait for it to end, or choose another "
            "--trainer.default_root_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held.append((handle, made))
    remove_debris(path)
    return handle


# the temp names of the run's own writers: atomic_write's `.NAME.XXXXXXXX.tmp` (config.yaml, metrics.csv, checkpoints)
# and stage_adapter's `.adapter.XXXXXXXX` / replace_dir's `.adapter.old-PID`
_TEMP = r"[a-z0-9_]{8}"  # tempfile's random part
DEBRIS = {
    ".": rf"\.(config\.yaml|metrics\.csv)\.{_TEMP}\.tmp|\.adapter\.({_TEMP}|old-\d+)",
    "checkpoints": rf"\.[^/]+\.ckpt\.{_TEMP}\.tmp",
}
_STARTED = time.time()  # this process's start, near enough: what is older was made by another process


def remove_debris(path: Path) -> None:
    """Remove what an earlier fit killed while saving left in the run directory `path` (held by this process's
    lock, so no other fit is writing there): the temp files and directories of its own writers, older than this
    process. A checkpoint's temp file is as large as a checkpoint, an adapter's as an adapter."""
    removed, size = 0, 0
    for folder, pattern in DEBRIS.items():
        directory = path / folder
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if not re.fullmatch(pattern, entry.name) or entry.is_symlink() or entry.lstat().st_mtime >= _STARTED:
                continue
            files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
            size += sum(f.stat().st_size for f in files)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
    if removed:
        log.info("removed %d temp files of an interrupted save from %s (%.1f MB)", removed, path, size / 1e6)


def check_config_home(config_files: list, root: str | Path | None, argv: list[str], *, resuming: bool,
                      overwrite: bool) -> None:  # fmt: skip
    """A run's config.yaml pins its run directory (`trainer.default_root_dir`, often absolute): copied or moved with
    the run, it would still point at the run it came from. So a `--config .../config.yaml` sitting in another
    directory than the one it pins is refused unless `--trainer.default_root_dir` is given on the command line,
    naming both: `--overwrite true` never clears, and `--ckpt_path last` never continues, a run the user did not
    name. A fit that starts a run over names the directory it will clear."""
    if root is None:
        return
    root = Path(root)
    named = any(arg == "--trainer.default_root_dir" or arg.startswith("--trainer.default_root_dir=") for arg in argv)
    for file in (Path(str(f)) for f in config_files or []):
        if named or file.name != RUN_CONFIG or file.parent.resolve() == root.resolve():
            continue
        if not root.exists():
            what = "which does not exist: moved?"
        elif overwrite:
            what = "which --overwrite true would clear"
        elif resuming:
            what = "the run --ckpt_path would continue"
        else:
            what = "where this fit would train"
        raise ConfigError(
            f"{file} sits in {file.parent} but pins --trainer.default_root_dir {root} ({what}): name the run "
            f"directory on the command line, --trainer.default_root_dir {file.parent} for the run where the config "
            f"sits, or {root}"
        )
    if overwrite and holds_run(root):
        log.warning("--overwrite true: the run in %s is cleared once training starts", root)


def release_runs() -> None:
    """Release the run directories this process locked: the next fit in the same process (a notebook, a test) may
    use them again. A directory the lock itself made and nothing else wrote to (a fit refused before it began)
    goes again, with the parents made for it: a mistake leaves no trace."""
    while _held:
        handle, made = _held.pop()
        lock = Path(handle.name)
        if made and [p.name for p in lock.parent.iterdir()] == [LOCK_FILE]:
            lock.unlink()  # while still held: no other fit can have taken it in between
            for directory in made:
                if any(directory.iterdir()):
                    break
                directory.rmdir()
        handle.close()  # closing the file drops its flock


def clear_run(path: Path) -> None:
    """Remove an earlier run's files (`--overwrite true`), once the new run has started training."""
    for name in RUN_FILES:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for checkpoint in (path / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()


def stage_adapter(pl_module, adapter: Path) -> Path | None:
    """Write the module's PEFT adapter into a temp directory beside `adapter`, flushed to disk; None without one."""
    policy = getattr(pl_module, "policy", None)
    if policy is None:
        return None
    adapter.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=adapter.parent, prefix=f".{adapter.name}."))
    try:
        # the active adapter alone: not the frozen copy of a starting adapter that DPO keeps as its reference
        policy.save_pretrained(staged, selected_adapters=[policy.active_adapter])
        for file in staged.rglob("*"):
            if file.is_file():
                _fsync(file)
    except BaseException:
        discard_adapter(staged)
        raise
    return staged


def commit_adapter(staged: Path, adapter: Path) -> None:
    """Put a staged adapter in place of `adapter`: two renames, so a reader finds the old one or the new one."""
    replace_dir(staged, adapter)


def replace_dir(staged: Path, target: Path) -> None:
    """Put the directory `staged` in place of `target` (a sibling): the old one goes aside (`.NAME.old-PID`), the new
    one is renamed in, the old one is removed; a reader finds the old one or the new one, never half of one. The new
    one gets a plain write's modes first (mkdtemp and safetensors write in private)."""
    share_like_plain_writes(staged)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_adapter(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def write_error(err: OSError, path: str | Path, saved_step: int | None = None) -> RunDirError:
    """One line for a write that failed in a run directory: a full disk, a read-only or forbidden directory."""
    reason = "no space left on the device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror or str(err)
    kept = f"; last.ckpt and adapter/ stay at step {saved_step}" if saved_step else ""
    return RunDirError(
        f"cannot write {path}: {reason}{kept}. Free space (or fix the permissions), then continue with --ckpt_path last"
    )


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
