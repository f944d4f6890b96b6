"""Mistakes in the data settings and files, through the real `cli.py`: one line naming the flag, file, row or
field, and exit code 2."""

from __future__ import annotations

import json

import pytest

from alignment.data import PreferenceDataModule
from alignment.errors import ConfigError
from tests.test_cli import run_cli


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--data.batch_size", "0", "--data.batch_size must be at least 1, got 0"),
        ("--data.eval_batch_size", "0", "--data.eval_batch_size must be at least 1, got 0"),
        ("--data.pad_to_multiple_of", "0", "--data.pad_to_multiple_of must be at least 1, got 0"),
    ],
)
@pytest.mark.slow
def test_a_size_below_one_is_one_line_and_exit_2(tmp_path, flag, value, expected):
    result = run_cli("fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(tmp_path / "run"), flag, value)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: {expected}", lines[-5:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_chat_message_with_an_unknown_role_is_one_line_and_exit_2(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    bad = {"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"}
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [good, good, bad]))
    result = run_cli("fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--data.path", str(pairs))  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {pairs}, line 3: field 'prompt', message 1: unknown role 'human'; expected one of system, user, "
        "assistant (rename roles such as 'human'/'gpt' before training)"
    )


@pytest.mark.parametrize("field", ["batch_size", "eval_batch_size", "pad_to_multiple_of", "max_length"])
def test_the_data_module_refuses_sizes_below_one(field):
    with pytest.raises(ConfigError, match=f"--data.{field} must be at least 1, got 0"):
        PreferenceDataModule(**{field: 0})
