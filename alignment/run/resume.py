"""What exact resume needs beyond Lightning's own: atomic checkpoint files, the metrics file kept up to the
checkpoint, and `ExactResume` (the RNG state, and a refusal to continue a run with another model, data or method)."""

from __future__ import annotations

import csv
import io
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from alignment.errors import ConfigError, RunDirError
from alignment.files import atomic_write
from alignment.hub import resolve_base
from alignment.methods.reference_cache import weights_identity
from alignment.run.rundir import write_error

log = logging.getLogger(__name__)

# settings a resumed run may change: speed and memory knobs, which change neither what is learnt nor the order
# it is learnt in (only float rounding, so a resume that changes them is no longer bit-exact)
MAY_CHANGE = {"gradient_checkpointing", "reference_cache", "reference_cache_dir", "lean_logps", "logits_chunk_size"}


class RunCSVLogger(Logger):
    """metrics.csv in the run directory, one row per logged step (columns: every metric name, sorted, and `step`).

    Writes nothing until training really starts (`start()`, called by the run at train start), so a run that fails
    or is refused before that leaves an earlier run's metrics.csv as it was. Resuming, it keeps the rows logged up
    to the checkpoint's step and drops later ones (the resumed run logs those steps again); starting afresh, it
    replaces the file. Each save rewrites the file atomically. No hparams.yaml: the run's config.yaml holds them.
    """

    METRICS_FILE = "metrics.csv"

    def __init__(
        self, save_dir: str | Path, *, keep_until_step: int | None = None, flush_logs_every_n_steps: int = 100
    ):
        super().__init__()
        self.run_dir = Path(save_dir)
        self.keep_until_step = keep_until_step
        self.flush_logs_every_n_steps = flush_logs_every_n_steps
        self.started = False
        self.rows: list[dict[str, Any]] = []  # what metrics.csv holds
        self.pending: list[dict[str, Any]] = []  # logged, not yet written

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / self.METRICS_FILE

    @rank_zero_only
    def start(self) -> None:
        self.rows = self._kept_rows()
        self._write()
        self.started = True

    def _kept_rows(self) -> list[dict[str, str]]:
        if self.keep_until_step is None or not self.metrics_file.is_file():
            return []
        with self.metrics_file.open(newline="") as file:
            rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]
        return [row for row in rows if int(float(row.get("step", "inf"))) <= self.keep_until_step]

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {key: value.item() if isinstance(value, torch.Tensor) else value for key, value in metrics.items()}
        row["step"] = step = len(self.rows) + len(self.pending) if step is None else step
        self.pending.append(row)
        if (step + 1) % self.flush_logs_every_n_steps == 0:
            self.save()

    @rank_zero_only
    def log_hyperparams(self, params=None, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def save(self) -> None:
        if not self.started or not self.pending:
            return
        self.rows, self.pending = self.rows + self.pending, []
        self._write()

    def _write(self) -> None:
        try:
            if self.rows:
                header = sorted(set().union(*self.rows))
                atomic_write(self.metrics_file, lambda handle: _write_rows(handle, header, self.rows))
            else:
                self.metrics_file.unlink(missing_ok=True)
        except OSError as err:
            raise write_error(err, self.metrics_file) from err

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            self.save()
        except RunDirError:
            if status != "failed":
                raise
            # the error that stopped the run is the one to report; a resume logs these steps again


def _write_rows(handle, header: list[str], rows: list[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    handle.write(text.getvalue().encode())


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint was saved at; a RunDirError naming the file (and another one to use) when it is
    damaged."""
    try:
        return _read_step(Path(path))
    except Exception as err:  # a truncated zip, garbage, a missing key: torch says OSError, RuntimeError, ...
        raise damaged_checkpoint(Path(path), err) from err


def _read_step(path: Path) -> int:
    # mmap: only the few bytes of the step are read, not the adapters and optimizer state
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def damaged_checkpoint(path: Path, err: BaseException) -> RunDirError:
    """The error for a checkpoint that cannot be read, naming the readable checkpoint beside it, if there is one."""
    readable = []
    for other in sorted(path.parent.glob("*.ckpt")):
        if other != path:
            try:
                readable.append((_read_step(other), str(other)))
            except Exception:
                continue
    hint = "no other checkpoint in the directory: start the run over with --overwrite true"
    if readable:
        step, other = max(readable)
        hint = f"{other} (step {step}) is readable: pass it as --ckpt_path {other}"
    return RunDirError(f"{path} is damaged, not a readable checkpoint ({type(err).__name__}); {hint}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file in their own directory, then renamed: a kill during a save leaves the
    previous last.ckpt whole. (Lightning's writer stages in the system temp directory, and moving from there onto
    another file system copies in place, which is not atomic.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError as err:
            raise RunDirError(f"checkpoint {path} does not exist") from err
        except Exception as err:
            raise damaged_checkpoint(Path(path), err) from err


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


# data settings a resumed run may change: where the pairs are read from and how they are cut (the training pairs'
# digest says whether the pairs themselves changed), and validation and loading knobs
DATA_MAY_CHANGE = {
    "path", "split", "val_path", "val_split", "val_fraction", "columns", "limit", "tokenizer", "revision",
    "use_chat_template", "max_length", "max_prompt_length", "eval_batch_size", "pad_to_multiple_of", "num_workers",
}  # fmt: skip


class ExactResume(Callback):
    """The bookkeeping of an exact resume, beyond Lightning's loop, optimizer and data-loader state.

    Saves every process's RNG state (LoRA dropout draws from it) and the run's identity (method, training pairs,
    process layout) in each checkpoint. On resume, refuses another method, another setting of the model or the
    objective, or other training pairs or batching (comparing the hyper-parameters Lightning saved in the
    checkpoint with the current ones, less the knobs that may change: `MAY_CHANGE`, `DATA_MAY_CHANGE`), and puts
    the RNG state back at the first step. The CLI adds one to every trainer it builds.

    It also records the seed the run was started with (`seed`, --seed_everything): a resumed run draws from the
    checkpoint's RNG state, so another seed on resume changes nothing; the run keeps its own (`saved_seed`), says
    so, and its config.yaml keeps it too (`run_seed`).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.saved_seed: int | None = None  # on a resume, the seed the run was started with
        self._rng_to_restore: dict[str, Any] | None = None
        self._base_weights: dict[str, str | None] = {}  # the base's identity, worked out once per run

    def base_weights(self, pl_module: L.LightningModule) -> str | None:
        if "base" not in self._base_weights:
            self._base_weights["base"] = base_identity(pl_module)
        return self._base_weights["base"]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # dropout's masks after the resume are those the run would have drawn, in every process
        checkpoint["rng"] = rng_states(trainer)
        checkpoint["run"] = run_identity(pl_module, trainer.datamodule, trainer, self.base_weights(pl_module))
        seed = self.seed if self.saved_seed is None else self.saved_seed
        if seed is not None:
            checkpoint["run"]["seed"] = seed

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == "fit" and "run" in checkpoint:  # a resume, not a validate --ckpt_path
            check_resume(checkpoint, pl_module, trainer.datamodule, trainer, self.base_weights(pl_module))
            self.saved_seed = checkpoint["run"].get("seed")
            if self.saved_seed is not None and self.saved_seed != self.seed and trainer.is_global_zero:
                log.warning(
                    "--seed_everything %s: the run was started with seed %s, and a resumed run draws from its "
                    "checkpoint's random state, so it goes on as seed %s did; its config.yaml keeps %s",
                    self.seed, self.saved_seed, self.saved_seed, self.saved_seed,
                )  # fmt: skip
        states = checkpoint.get("rng") or [None]
        rank = trainer.global_rank
        self._rng_to_restore = states[rank] if rank < len(states) else states[0]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
                             ) -> None:  # fmt: skip
        # restored here, at the first step after loading a checkpoint, not when loading it: nothing drawn in
        # between (sanity check, data loading) can shift it
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


def run_seed(trainer: L.Trainer, given: Any) -> Any:
    """The seed to write in a run's config.yaml: on a resume, the one the run was started with, else `given`."""
    saved = [c.saved_seed for c in trainer.callbacks if isinstance(c, ExactResume) and c.saved_seed is not None]
    return saved[0] if saved else given


def base_identity(module) -> str | None:
    """What names the weights of the module's base (`--model.base`), as the reference cache names them: the commit
    of a hub snapshot, else a hash of the directory's files (remembered per file, so hashed once)."""
    hparams = getattr(module, "hparams", {})
    if hparams.get("base") is None:
        return None
    revision = hparams.get("revision")
    return weights_identity(resolve_base(hparams["base"], revision), revision)


def run_identity(module, datamodule, trainer, base_weights: str | None = None) -> dict[str, Any]:
    """What a checkpoint records of its run beside the hyper-parameters Lightning saves: the method, the weights of
    its base and of the adapter it started from, the training pairs, and the process layout."""
    identity: dict[str, Any] = {"method": type(module).__name__, "model": {}}
    if base_weights is not None:  # a directory's files may have been replaced under the same --model.base
        identity["model"]["base_weights"] = base_weights
    if getattr(module, "starting_adapter", None):  # --model.adapter's file may have been trained over since
        identity["model"]["adapter_weights"] = module.starting_adapter["weights"]
    if datamodule is not None and hasattr(datamodule, "digest"):
        identity["data"] = {"training pairs (content, tokenization, truncation)": datamodule.digest("train")}
    identity["processes"] = {"world_size": trainer.world_size, "accumulate": trainer.accumulate_grad_batches}
    return identity


def _settings(hparams: Any, may_change: set[str]) -> dict[str, Any]:
    return {k: v for k, v in dict(hparams or {}).items() if k not in may_change and not k.startswith("_")}


def check_resume(checkpoint: dict, module, datamodule, trainer, base_weights: str | None = None) -> None:
    """Refuse a different method, base, model, objective or data; warn when only the process layout differs.
    A checkpoint written before runs recorded their base's weights resumes on whatever the base holds now."""
    saved, current = checkpoint["run"], run_identity(module, datamodule, trainer, base_weights)
    where = str(trainer.ckpt_path or "the checkpoint")
    if saved.get("method") != current["method"]:
        raise ConfigError(
            f"cannot resume: {where} was trained with {saved.get('method')}, this run is {current['method']}; "
            "start a new run in another --trainer.default_root_dir"
        )
    saved_model = {k: v for k, v in saved.get("model", {}).items() if k != "base_weights"}
    current_model = {k: v for k, v in current["model"].items() if k != "base_weights"}
    check_base(saved.get("model", {}).get("base_weights"), base_weights, module, checkpoint, where)
    model = _settings(checkpoint.get("hyper_parameters"), MAY_CHANGE) | saved_model
    groups = {"model": (model, _settings(module.hparams, MAY_CHANGE) | current_model)}
    if "data" in current and "datamodule_hyper_parameters" in checkpoint:
        data = _settings(checkpoint["datamodule_hyper_parameters"], DATA_MAY_CHANGE) | saved.get("data", {})
        groups["data"] = (data, _settings(datamodule.hparams, DATA_MAY_CHANGE) | current["data"])
    changed = [
        f"{group}.{key}: {before.get(key)!r} in the checkpoint, {value!r} now"
        for group, (before, now) in groups.items()
        for key, value in now.items()
        if before.get(key, value) != value
    ]
    if changed:
        raise ConfigError(
            f"cannot resume from {where}: this run changes " + "; ".join(changed)
            + ". Resume with the run's own config.yaml, or start a new run in another --trainer.default_root_dir"
        )  # fmt: skip
    if saved.get("processes") != current["processes"]:
        log.warning(
            "resuming with %s instead of %s: training continues, but the batches differ from an uninterrupted run",
            current["processes"], saved.get("processes"),
        )  # fmt: skip


def check_base(saved: str | None, now: str | None, module, checkpoint: dict, where: str) -> None:
    """Refuse a resume whose `--model.base` names the run's base but holds other weights (a directory whose files
    were replaced, a snapshot of another commit). Identities of different kinds (a hub name resolved online, its
    snapshot offline) cannot be compared, and a checkpoint without the record (an older run) passes."""
    if saved is None or now is None or saved.split(":", 1)[0] != now.split(":", 1)[0] or saved == now:
        return
    base = module.hparams.get("base")
    if (checkpoint.get("hyper_parameters") or {}).get("base", base) != base:
        return  # another --model.base altogether: the comparison of the settings names it
    raise ConfigError(
        f"cannot resume from {where}: --model.base {base} holds other weights than the run was trained on "
        f"({saved[:23]}... in the checkpoint, {now[:23]}... now); resume on the run's own base, or start a new run "
        "on this one in another --trainer.default_root_dir"
    )
