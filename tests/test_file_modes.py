"""What the runs write is readable as a plain write would be: 0644 files and 0755 directories under umask 022 (and
the umask honoured under another), though the writers stage their files in private (mkdtemp's 0700, safetensors'
0600 temp files) before renaming them into place: adapters, merged models, the converted and tiny bases."""

import os
import stat
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from alignment.commands.merge import merge_adapter
from alignment.files import atomic_write, share_like_plain_writes
from alignment.hub.tiny import build_tiny_model
from tests.demo_runs import demo_run


@pytest.fixture
def umask():
    """Sets the process's umask for one test, then restores it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def modes(directory):
    """{path relative to `directory`: permission bits} of the directory and everything in it."""
    paths = [directory, *directory.rglob("*")]
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def not_plain(directory):
    """The paths under `directory` (itself included) whose modes are not 0644 for a file, 0755 for a directory."""
    return {path: oct(mode) for path, mode in modes(directory).items()
            if mode != (0o755 if (directory / path).is_dir() else 0o644)}  # fmt: skip


@pytest.mark.parametrize("mask, files, dirs", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_a_tree_staged_in_private_gets_the_modes_of_a_plain_write(tmp_path, umask, mask, files, dirs):
    umask(mask)
    staged = tempfile.mkdtemp(dir=tmp_path)
    (sub := tmp_path / staged / "sub").mkdir()
    save_file({"w": torch.zeros(2)}, str(sub / "model.safetensors"))
    assert stat.S_IMODE(os.stat(staged).st_mode) == 0o700  # what the writers start from
    assert stat.S_IMODE((sub / "model.safetensors").stat().st_mode) == 0o600

    share_like_plain_writes(staged)
    tree = modes(tmp_path / staged)
    assert tree == {".": dirs, "sub": dirs, "sub/model.safetensors": files}


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    atomic_write(tmp_path / "metrics.csv", lambda handle: handle.write(b"step\n"))
    umask(0o077)
    atomic_write(tmp_path / "private.csv", lambda handle: handle.write(b"step\n"))
    assert stat.S_IMODE((tmp_path / "metrics.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.csv").stat().st_mode) == 0o600


def test_the_tiny_base_is_cached_readable(tmp_path, umask):
    target = build_tiny_model(tmp_path)
    assert (target / "model.safetensors").is_file() and not_plain(target) == {}


def test_a_run_s_adapter_and_its_merged_model_are_readable_to_the_group(tmp_path, umask):
    adapter = demo_run("dpo") / "adapter"  # trained under the usual umask 022
    assert (adapter / "adapter_model.safetensors").is_file() and not_plain(adapter) == {}

    merged = merge_adapter(demo_run("dpo"), tmp_path / "merged", dtype="float32")
    assert (merged / "model.safetensors").is_file() and not_plain(merged) == {}
