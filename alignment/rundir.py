"""A finished or running run directory, as the after-training commands read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignment.errors import ConfigError

ADAPTER_FILE = "adapter_config.json"


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
        file = self.path / "config.yaml"
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
    if (given / ADAPTER_FILE).is_file():
        return given
    run = open_run(given)
    if not (run.adapter / ADAPTER_FILE).is_file():
        raise ConfigError(
            f"{run.path} holds no adapter ({run.adapter / ADAPTER_FILE} is missing): the run has not finished "
            "training, or it is not a run directory"
        )
    return run.adapter


def run_of_adapter(adapter: Path) -> RunDir | None:
    """The run an adapter directory was exported by (its parent, when that holds a config.yaml)."""
    parent = RunDir(adapter.parent)
    return parent if (parent.path / "config.yaml").is_file() else None


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
