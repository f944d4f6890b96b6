"""Callbacks: export the trained adapter in PEFT format; keep last.ckpt at the final step."""

from __future__ import annotations

import logging
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
    """ModelCheckpoint that also leaves last.ckpt at the final step when training stops between two saves
    (e.g. at max_steps in the middle of an epoch), so `--ckpt_path last` continues from where it ended."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and trainer.global_step != self._last_global_step_saved:
            trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
