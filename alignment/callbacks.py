"""Callbacks: export the trained adapter in PEFT format; keep last.ckpt at the step training stopped at."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class AdapterExport(L.Callback):
    """Write the LoRA adapter (`adapter_model.safetensors` + `adapter_config.json`) when training ends or stops.

    The directory loads with `PeftModel.from_pretrained(base, directory)`.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @rank_zero_only
    def _export(self, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "policy", None) is None:
            return
        pl_module.policy.save_pretrained(self.directory)
        log.info("adapter written to %s", self.directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step > 0:  # keep what was learnt before an interrupt
            self._export(pl_module)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps last.ckpt at the step training stopped at.

    - When training ends between two saves (e.g. at max_steps in the middle of an epoch), last.ckpt is rewritten.
    - On SIGTERM (a scheduler's pre-emption, `kill`) or Ctrl-C, the optimizer step in flight is finished (a
      gradient accumulation too), last.ckpt is saved at that step and training stops cleanly; `--ckpt_path last`
      continues from there. A second signal stops at once, through Lightning's interrupt path.
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_signal: str | None = None
        self._handlers: dict[int, object] = {}
        self._step_at_batch_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.stop_signal = None
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set them
            self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in self.STOP_SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None:
            self._restore_handlers()
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        log.warning("%s: saving last.ckpt after this step, then stopping (again to stop at once)", self.stop_signal)

    def _restore_handlers(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: the signal waits for the optimizer step
        # a signal may reach one process only (kill PID): any process asking stops them all at the same step
        if not trainer.strategy.reduce_boolean_decision(self.stop_signal is not None, all=False):
            return
        if trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning(
                "stopped at step %d (%s); last.ckpt is in %s: continue with --ckpt_path last",
                trainer.global_step, self.stop_signal or "signal to another process", self.dirpath,
            )  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and trainer.global_step != self._last_global_step_saved:
            trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)
