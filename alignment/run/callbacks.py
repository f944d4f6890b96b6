"""The run's checkpoint callback: last.ckpt and the PEFT adapter saved together, at the step training stopped at,
with the length of the learning-rate schedule they belong to; and the stop at the first loss or gradient that is not
a finite number, before it reaches the weights they hold; and the warning when the chosen answers' likelihood falls
below the reference's while the margin grows."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from alignment.displacement import WINDOW, RewardPoint, displaced
from alignment.errors import ConfigError, RunDirError, RunFinished, TrainingDiverged
from alignment.run.rundir import commit_adapter, discard_adapter, stage_adapter, write_error

log = logging.getLogger(__name__)


def schedule_length(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """Optimizer steps of the whole run, as the module's learning-rate schedule counts them."""
    total_steps = getattr(pl_module, "_total_steps", None)
    return int(total_steps()) if callable(total_steps) else int(trainer.estimated_stepping_batches)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps last.ckpt, and the adapter beside it, at the step training stopped at.

    - Every last.ckpt is saved together with the adapter (`adapter_dir`, PEFT format: `PeftModel.from_pretrained(base,
      adapter_dir)`): the adapter is written to a temp directory first and renamed into place only once last.ckpt is
      written, so the two always hold the same step. A failed save (a full disk) leaves both at the previous step.
    - When training ends between two saves (e.g. at max_steps in the middle of an epoch), last.ckpt is rewritten.
    - On SIGTERM (a scheduler's pre-emption, `kill`) or Ctrl-C, the optimizer step in flight is finished (a
      gradient accumulation too), last.ckpt is saved at that step and training stops at once, without a validation
      pass; `--ckpt_path last` continues from there. A second signal stops at once, through Lightning's interrupt path.
    - The checkpoint holds the schedule's length (`schedule.total_steps`): a resume that would stretch or shrink the
      schedule is refused, and resuming a run that already reached its end trains nothing (`RunFinished`).
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
    SCHEDULE_KEY = "schedule"

    def __init__(self, *args, adapter_dir: str | Path | None = None, **kwargs):
        # on_exception below decides what an exception may save: Lightning's would also retry a failed save
        self._keep_on_exception = kwargs.pop("save_on_exception", False)
        super().__init__(*args, **kwargs)
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.stop_signal: str | None = None
        self._handlers: dict[int, object] = {}
        self._step_at_batch_start = 0
        self._schedule_steps: int | None = None
        self._save_failed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the model is built: an adapter this run would overwrite cannot be the one it starts from
        adapter = getattr(pl_module, "hparams", {}).get("adapter")
        if adapter is not None and self.adapter_dir is not None:
            if Path(adapter).resolve().is_relative_to(self.adapter_dir.resolve()):
                raise ConfigError(f"--model.adapter {adapter} is where this run saves its own adapter "
                                  f"({self.adapter_dir}): copy it elsewhere, or train in another "
                                  "--trainer.default_root_dir")  # fmt: skip
        super().setup(trainer, pl_module, stage)

    # ---- saving -------------------------------------------------------------------------------------------------
    # ModelCheckpoint has no public hook around its own write of a checkpoint (the adapter is committed right after
    # last.ckpt), nor a public way to save last.ckpt now: these three use its private members, as pinned in pyproject.

    # private API, checked on lightning 2.6: every checkpoint ModelCheckpoint writes goes through here
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        last = Path(filepath).name == f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        staged, writing = None, filepath
        try:
            check_finite_weights(trainer, self.saved_step)  # a diverged step never replaces the last good files
            if last and self.adapter_dir is not None and trainer.is_global_zero:
                writing = self.adapter_dir
                staged = stage_adapter(trainer.lightning_module, self.adapter_dir)
                writing = filepath
            super()._save_checkpoint(trainer, filepath)  # private API, checked on lightning 2.6: see above
            if staged is not None:
                writing = self.adapter_dir
                commit_adapter(staged, self.adapter_dir)
                staged = None
        except OSError as err:
            self._save_failed = True
            raise write_error(err, writing, self.saved_step) from err
        except BaseException:
            self._save_failed = True
            raise
        finally:
            if staged is not None:
                discard_adapter(staged)

    @property
    def saved_step(self) -> int:
        """The global step of the last checkpoint written (0 before any)."""
        return self._last_global_step_saved  # private API, checked on lightning 2.6: no public counterpart

    def save_last_now(self, trainer: L.Trainer) -> None:
        """last.ckpt (and the adapter) at the current step, through ModelCheckpoint's own path (its state follows)."""
        # private API, checked on lightning 2.6: what ModelCheckpoint itself calls to save last.ckpt
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._schedule_steps is not None:
            checkpoint[self.SCHEDULE_KEY] = {"total_steps": self._schedule_steps}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        saved = (checkpoint.get(self.SCHEDULE_KEY) or {}).get("total_steps")
        if saved is None or trainer.state.fn != "fit":
            return
        now, step = schedule_length(trainer, pl_module), int(checkpoint["global_step"])
        if now != saved:
            raise ConfigError(
                f"cannot resume from {trainer.ckpt_path}: its learning-rate schedule is {saved} optimizer steps long, "
                f"this run's would be {now} (--trainer.max_epochs, --trainer.max_steps, --trainer.limit_train_batches "
                "and --trainer.accumulate_grad_batches set it). A resumed run keeps its schedule: resume with the "
                "run's own settings, or train longer in a new run (another --trainer.default_root_dir)"
            )
        if step >= saved:
            raise RunFinished(f"nothing to resume: {trainer.default_root_dir} finished at step {step}")

    # ---- stopping on a signal -----------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._schedule_steps = schedule_length(trainer, pl_module)
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
        if trainer.global_step != self.saved_step:
            self.save_last_now(trainer)
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates before honouring should_stop: a stop is prompt
        if trainer.is_global_zero:
            log.warning(
                "stopped at step %d (%s); last.ckpt is in %s: continue with --ckpt_path last",
                trainer.global_step, self.stop_signal or "signal to another process", self.dirpath,
            )  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and trainer.global_step != self.saved_step:
            self.save_last_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A second Ctrl-C, or a crash between two saves: keep what was learnt in last.ckpt and the adapter. Nothing
        is saved when the exception came from a save itself (a full disk) or before training started (a refused
        resume, a finished run)."""
        self._restore_handlers()
        started = self._schedule_steps is not None
        if not self._keep_on_exception or self._save_failed or not started:
            return
        if isinstance(exception, (RunDirError, RunFinished, TrainingDiverged)):
            return
        if self.save_last and self.dirpath and trainer.global_step not in (0, self.saved_step):
            self.save_last_now(trainer)


class StopOnDivergence(Callback):
    """Stops training at the first loss or gradient that is not a finite number (a learning rate far too high, an
    overflow), before the optimizer step that would carry it into the weights: a `TrainingDiverged` naming the
    step, the value and what to try. Nothing is saved after it (`RunCheckpoint` skips a diverged run, and refuses
    to save weights that are not finite): last.ckpt and adapter/ stay at the last step saved before.

    Costs one host sync per optimizer step. Under a float16 GradScaler (`16-mixed`), gradients are not checked: an
    overflow there is the scaler's signal to skip the step and lower its scale, not a divergence.
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []  # the micro-batches' losses since the last optimizer step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        losses, self._losses = self._losses, []
        grads = []
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        flags = [value.isfinite().all() for value in (*losses, *grads)]
        finite = bool(torch.stack(flags).all()) if flags else True
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        bad_loss = next((value for value in losses if not value.isfinite().all()), None)
        if bad_loss is not None:
            what = f"the loss is {bad_loss.float().item()}"
        elif finite:
            what = "the loss or a gradient is not finite in another process"
        else:
            names = {id(p): name for name, p in pl_module.named_parameters()}
            group_params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            bad = [p for p in group_params if not _local(p.grad).isfinite().all()]
            what = f"the gradient of {len(bad)} adapter tensors is not finite (first: {names.get(id(bad[0]), '?')})"
        raise TrainingDiverged(diverged_message(trainer, trainer.global_step + 1, what))


class DisplacementWarning(Callback):
    """One warning line, once per run (process 0 only), when the logged train rewards of a method that scores a
    reference (DPO, KTO) show likelihood displacement over the last `window` logs: rewards/chosen below 0 and
    falling while rewards/margins rise (`alignment.displacement.displaced`; Razin et al. 2024, arXiv:2410.08847).
    Methods without a reference log the policy's own log-probs as rewards, always below 0: it stays silent there.

    Reads the values the module puts in `trainer.callback_metrics` at each train log; the points it read and the
    step it warned at are kept in checkpoints, so a resumed run neither loses its window nor warns twice.
    """

    CHOSEN, MARGIN = "train/rewards/chosen", "train/rewards/margins"

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.points: list[RewardPoint] = []
        self.warned_at: int | None = None  # the step of the log that showed it first
        self._active = False
        self._last_read: object = None  # the logged tensor read last: the module logs new tensors each time

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = bool(getattr(pl_module, "has_reference", False))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._read(trainer, pl_module)  # the module logs after the callbacks' on_train_batch_end: read it here

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, pl_module)

    def _read(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        chosen, margin = trainer.callback_metrics.get(self.CHOSEN), trainer.callback_metrics.get(self.MARGIN)
        if not self._active or chosen is None or margin is None or chosen is self._last_read:
            return
        if self.points and self.points[-1].step == trainer.global_step:
            return
        self._last_read = chosen
        self.points = [*self.points, RewardPoint(trainer.global_step, float(chosen), float(margin))][-self.window :]
        if self.warned_at is None and len(self.points) == self.window and displaced(self.points):
            self.warned_at = trainer.global_step
            if trainer.is_global_zero:
                log.warning(displacement_message(self.points, pl_module))

    def state_dict(self) -> dict:
        return {"points": [list(p) for p in self.points], "warned_at": self.warned_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = [RewardPoint(int(s), float(c), float(m)) for s, c, m in state_dict.get("points", [])]
        self.warned_at = state_dict.get("warned_at")


def displacement_message(points: list[RewardPoint], pl_module: L.LightningModule) -> str:
    first, last = points[0], points[-1]
    remedies = "a lower --model.learning_rate, or fewer epochs"
    if "rpo_alpha" in getattr(pl_module, "hparams", {}):  # DPO: its NLL term on the chosen answers
        remedies = "--model.rpo_alpha 1.0 (adds the chosen answers' NLL to the loss), " + remedies
    return (
        f"likelihood displacement from step {first.step}: rewards/chosen fell from {first.chosen:.3g} to "
        f"{last.chosen:.3g} by step {last.step}, below 0, while rewards/margins rose from {first.margin:.3g} to "
        f"{last.margin:.3g}. The policy now finds the chosen answers less likely than the reference does; the margin "
        "grows because the rejected answers fall faster, and the probability both lose goes to other answers "
        "(Razin et al. 2024). Accuracy can keep rising meanwhile. To keep the chosen answers likely: "
        f"{remedies}. `report` marks the region on the reward curves"
    )


def check_finite_weights(trainer: L.Trainer, saved_step: int) -> None:
    """A `TrainingDiverged` instead of a checkpoint when a trainable weight is not finite (in any process)."""
    module = trainer.lightning_module
    weights = [_local(p.detach()) for p in module.parameters() if p.requires_grad]
    finite = bool(torch.stack([w.isfinite().all() for w in weights]).all()) if weights else True
    if not trainer.strategy.reduce_boolean_decision(finite, all=True):
        bad = sum(not w.isfinite().all() for w in weights)
        what = f"{bad} adapter tensors are not finite" if bad else "adapter tensors are not finite in another process"
        raise TrainingDiverged(diverged_message(trainer, trainer.global_step, what, saved_step))


def diverged_message(trainer: L.Trainer, step: int, what: str, saved_step: int | None = None) -> str:
    if saved_step is None:
        checkpoint = trainer.checkpoint_callback
        saved_step = checkpoint.saved_step if isinstance(checkpoint, RunCheckpoint) else 0
    kept = f"last.ckpt and adapter/ stay at step {saved_step}" if saved_step else "nothing was saved"
    learning_rate = getattr(trainer.lightning_module, "hparams", {}).get("learning_rate")
    lr = f" (now {learning_rate:g})" if isinstance(learning_rate, (int, float)) else ""
    clip = "" if trainer.gradient_clip_val else " or --trainer.gradient_clip_val 1.0"
    return (
        f"training diverged at step {step}: {what}; {kept}. Try a lower --model.learning_rate{lr}{clip}, "
        "and start over with --overwrite true"
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (FSDP2 DTensor) tensor; the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
