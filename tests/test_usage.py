"""Mistakes in the command line, through the real `cli.py`: one line on stderr naming the flag or path, exit code 2;
and the help that lists the verbs."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.errors import ConfigError
from alignment.files import check_writable
from alignment.run.parser import check_wandb_login
from tests.test_cli import ROOT, run_cli

VERBS = ["fit", "validate", "report", "compare", "evaluate", "sweep", "merge"]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a mistake prints; fails unless stderr holds exactly that one line and the exit code is 2."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_help_lists_every_verb_and_no_test_or_predict():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == VERBS
    words = result.stdout.split()
    assert "test" not in words and "predict" not in words


def test_lightning_parser_offers_fit_and_validate_only(capsys, monkeypatch):
    from alignment.run.cli import run_cli as lightning_cli

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    with pytest.raises(SystemExit) as done:
        lightning_cli(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert "{fit,validate}" in usage and "test" not in usage.split() and "predict" not in usage


@pytest.mark.parametrize("verb", ["test", "predict", "generat"])
def test_an_unknown_verb_is_one_line(verb):
    line = error_line(run_cli(verb))
    assert line == f"error: unknown command {verb!r}: expected one of {', '.join(VERBS)}"


def test_no_verb_is_one_line():
    assert error_line(run_cli()) == f"error: name a command: {', '.join(VERBS)} (see python cli.py --help)"


@pytest.mark.parametrize("args", [["--help"], ["compare", "--help"], ["report", "--help"], ["merge", "--help"]])
def test_help_imports_neither_torch_nor_lightning(args):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "alignment.usage" in imported  # the importtime report is there at all
    assert not {"torch", "lightning", "transformers", "peft"} & imported


COLUMNS = """a mapping of field (prompt, chosen, rejected, system, completion, label, messages) to the data's \
column, e.g. --data.columns '{"prompt": "question"}'"""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--trainer.accumulate_grad_batches", "0"],
            "error: --trainer.accumulate_grad_batches must be at least 1, got 0",
        ),
        (["--data.columns", "prompt=question"], f"error: --data.columns: expected {COLUMNS}; got prompt=question"),
        (
            ["--data.columns", '{"promt": "question"}'],
            f"error: --data.columns: unknown field 'promt'; expected {COLUMNS}",
        ),
        (["--trainer.max_epochs", "abc"], "error: --trainer.max_epochs: expected one of [int, None], got abc"),
        (["--model.beta", "abc"], "error: --model.beta: expected a float. Got value: abc"),
        (["--model.beta", "-1"], "error: --model.beta must be > 0, got -1.0"),  # raised by the module, once seeded
        (["--trainer.bogus", "1"], "error: unrecognized arguments: --trainer.bogus 1 (see python cli.py fit --help)"),
        (["--config", "nothere.yaml"], f"error: --config: File does not exist: '{ROOT / 'nothere.yaml'}'"),
    ],
)
@pytest.mark.slow
def test_a_bad_fit_flag_is_one_line(tmp_path, args, expected):
    result = run_cli("fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(tmp_path / "run"), *args)
    assert error_line(result) == expected
    assert not (tmp_path / "run").exists()  # refused before the run began


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["report"], "error: the following arguments are required: runs (see python cli.py report --help)"),
        (["compare", "--prompts", "p.txt", "--max-new-tokens", "many"],
         "error: argument --max-new-tokens: invalid int value: 'many' (see python cli.py compare --help)"),
        (["merge", "runs/x"], "error: the following arguments are required: --out (see python cli.py merge --help)"),
        (["report", "runs/x", "--bogus"], "error: unrecognized arguments: --bogus (see python cli.py report --help)"),
    ],
)  # fmt: skip
def test_a_bad_flag_after_training_is_one_line(args, expected):
    assert error_line(run_cli(*args)) == expected


@pytest.mark.slow
def test_wandb_without_a_login_is_one_line_before_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path)  # no ~/.netrc, no ~/.config/wandb/settings
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", "demo.yaml", "--wandb", "true",
               "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert error_line(result) == (
        "error: --wandb true: no W&B login for api.wandb.ai (no WANDB_API_KEY, no entry in ~/.netrc): "
        "run `wandb login`, or set WANDB_MODE=offline to log into the run directory only"
    )
    assert not (tmp_path / "run").exists()


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_wandb_login_is_read_from_the_environment(no_wandb_login, monkeypatch):
    with pytest.raises(ConfigError, match="wandb login"):
        check_wandb_login()
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb_login()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_wandb_login()


def test_wandb_login_is_read_from_netrc_for_the_server_in_use(no_wandb_login, monkeypatch):
    netrc = no_wandb_login / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc.chmod(0o600)
    check_wandb_login()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    with pytest.raises(ConfigError, match="no W&B login for wandb.example.org"):
        check_wandb_login()


def test_wandb_offline_in_the_settings_file_needs_no_login(no_wandb_login):
    settings = no_wandb_login / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nmode = offline\n")
    check_wandb_login()


def test_check_writable_names_the_flag_and_creates_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b", "--out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"--out {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file"):
        check_writable(tmp_path / "file" / "x", "--out")


@functools.cache
def read_only_prefix() -> tuple[str, ...] | None:
    """A command prefix that runs a command with its first argument mounted read-only, or None where there is none.

    chmod does not stop root, so as root the directory is bind-mounted read-only in a user namespace."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("unshare") is None:
        return None
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    prefix = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount)
    probe = subprocess.run([*prefix, "/tmp", "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def run_in_read_only(directory: Path, *args: str) -> subprocess.CompletedProcess:
    prefix = read_only_prefix()
    if prefix is None:
        pytest.skip("running as root without user namespaces: no way to make a directory read-only")
    if not prefix:
        directory.chmod(0o555)
    command = [*prefix, *([str(directory)] if prefix else []), sys.executable, str(ROOT / "cli.py"), *args]
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    finally:
        directory.chmod(0o755)


@pytest.mark.parametrize(
    ("verb", "flag"),
    [
        (["fit", "--config", "demo.yaml"], "--trainer.default_root_dir"),
        (["report", "runs/x"], "--out"),
        (["compare", "--prompts", "p.txt"], "--out"),
        (["merge", "runs/x"], "--out"),
        (["sweep", "--config", "demo.yaml", "--grid", "model.beta=0.1,0.2"], "--out"),
    ],
)
@pytest.mark.slow
def test_a_read_only_output_is_one_line_naming_it(tmp_path, verb, flag):
    locked = tmp_path / "locked"
    locked.mkdir()
    result = run_in_read_only(locked, *verb, flag, str(locked / "out"))
    line = error_line(result)
    assert line.startswith(f"error: {flag} {locked / 'out'}: cannot write there ({locked} is not writable)"), line
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_while_they_wait_unless_the_user_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"OMP_WAIT_POLICY": given} if given else {})
    script = "import os, runpy, sys; sys.argv = ['cli.py', '--help']; runpy.run_path('cli.py', run_name='__main__')"
    script += "; print(os.environ['OMP_WAIT_POLICY'])"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == expected
