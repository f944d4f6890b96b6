"""What exact resume needs beyond Lightning's own: atomic checkpoint files, the RNG state, and a refusal to
continue a run with another model, data or method."""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from alignment.errors import ConfigError
from alignment.files import atomic_write

log = logging.getLogger(__name__)

# settings a resumed run may change: speed and memory knobs, which change neither what is learnt nor the order
# it is learnt in (only float rounding, so a resume that changes them is no longer bit-exact)
MAY_CHANGE = {"gradient_checkpointing", "reference_cache", "reference_cache_dir", "lean_logps", "logits_chunk_size"}


class RunCSVLogger(CSVLogger):
    """CSVLogger that, resuming a run, keeps the rows logged up to the checkpoint's step; Lightning's writer would
    delete metrics.csv. Rows after that step are dropped: the resumed run logs those steps again."""

    def __init__(self, *args, keep_until_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._kept: list[dict[str, str]] = []
        path = Path(self.log_dir) / "metrics.csv"
        if keep_until_step is not None and path.is_file():
            with path.open(newline="") as file:
                rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]
            self._kept = [row for row in rows if int(float(row.get("step", "inf"))) <= keep_until_step]

    @property
    @rank_zero_experiment
    def experiment(self):
        fresh = self._experiment is None
        writer = super().experiment
        if fresh and self._kept:
            writer.metrics[:0] = self._kept  # written with the first new rows, under one header
            self._kept = []
        return writer


def checkpoint_step(path: str | Path) -> int:
    # mmap: only the few bytes of the step are read, not the adapters and optimizer state
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file in their own directory, then renamed: a kill during a save leaves the
    previous last.ckpt whole. (Lightning's writer stages in the system temp directory, and moving from there onto
    another file system copies in place, which is not atomic.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def rng_state() -> dict[str, Any]:
    """The generators training draws from (LoRA dropout: torch's), as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_states(trainer) -> list[dict[str, Any]]:
    """Every process's RNG state, in rank order: under DDP the processes draw different dropout masks. A checkpoint
    is dumped on every process (only one writes it), so the states can be gathered there."""
    state = rng_state()
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:  # random.setstate wants tuples; a checkpoint round trip may give lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def run_identity(module, datamodule, trainer) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: the method, its model and objective settings, and the
    training pairs and their batching."""
    hparams = {k: v for k, v in dict(module.hparams).items() if k not in MAY_CHANGE}
    identity: dict[str, Any] = {"method": type(module).__name__, "model": hparams}
    if datamodule is not None and hasattr(datamodule, "digest"):
        data = datamodule.hparams
        identity["data"] = {
            "training pairs (content, tokenization, truncation)": datamodule.digest("train"),
            "batch_size": data.batch_size,
            "group_by_length": data.group_by_length,
            "seed": data.seed,
        }
    identity["processes"] = {"world_size": trainer.world_size, "accumulate": trainer.accumulate_grad_batches}
    return identity


def check_resume(saved: dict[str, Any], current: dict[str, Any], checkpoint: str = "the checkpoint") -> None:
    """Refuse a different method, model, objective or data; warn when only the process layout differs."""
    if saved.get("method") != current["method"]:
        raise ConfigError(
            f"cannot resume: {checkpoint} was trained with {saved.get('method')}, this run is {current['method']}; "
            "start a new run in another --trainer.default_root_dir"
        )
    changed = [
        f"{group}.{key}: {saved[group].get(key)!r} in the checkpoint, {value!r} now"
        for group in ("model", "data")
        if group in saved and group in current
        for key, value in current[group].items()
        if saved[group].get(key, value) != value
    ]
    if changed:
        raise ConfigError(
            f"cannot resume from {checkpoint}: this run changes " + "; ".join(changed)
            + ". Resume with the run's own config.yaml, or start a new run in another --trainer.default_root_dir"
        )  # fmt: skip
    if saved.get("processes") != current["processes"]:
        log.warning(
            "resuming with %s instead of %s: training continues, but the batches differ from an uninterrupted run",
            current["processes"], saved.get("processes"),
        )  # fmt: skip
