"""What every method shares: the 4-bit + LoRA policy, log-probs, logging, the optimizer, adapter-only checkpoints."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import lightning as L
import torch
from peft import PeftModel
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from alignment.data import IGNORE_INDEX, DataKind, PreferenceBatch, PreferenceDataModule, Split
from alignment.errors import ConfigError
from alignment.hub.tiny import TINY
from alignment.logprobs import sequence_logps, sequence_logps_from_hidden
from alignment.methods.reference_cache import adapter_identity
from alignment.metrics import MeanTracker
from alignment.model.heads import lean_disagreement, plain_head_weight
from alignment.model.load import (
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    adapter_weights,
    add_lora,
    load_base,
    load_lora,
    read_adapter,
)
from alignment.model.packing import pack_rows, pack_shared_prompts, packed_attention_problem, packed_sequence_logps

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SCHEDULE_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # transformers' names
# flag -> key in a PEFT adapter_config.json
_ADAPTER_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                 "lora_target_modules": "target_modules"}  # fmt: skip
REWARD_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected"]  # fmt: skip


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# the settings that decide the adapters' names and shapes
_ADAPTER_SHAPE = ("base", "adapter", "lora_r", "lora_target_modules")


class PreferenceModule(L.LightningModule):
    """Shared by every method: builds the policy (frozen base + LoRA), logs, optimizes, saves adapters only.

    Args:
        base: hub name or local path of the base model, a .gguf file, or "tiny" (a random 2-layer Llama built
            offline).
        revision: the hub revision (branch, tag or commit) of `base`; None: the default branch.
        adapter: a PEFT LoRA adapter directory of this base (e.g. an earlier run's adapter/) to start from; its
            LoRA settings replace the lora_* ones, and it is DPO's reference (frozen) instead of the bare base.
        load_in_4bit: quantize the base to nf4 with double quantization (pre-quantized bases stay as they are).
        compute_dtype: dtype of the base's computation; "auto": bfloat16 on CUDA, float32 on CPU.
        lora_r: rank of the LoRA matrices.
        lora_alpha: LoRA scaling numerator: the update is (alpha / r) * B @ A.
        lora_dropout: dropout on the LoRA branch's input during training.
        lora_target_modules: "all-linear" or a list of module names (e.g. [q_proj, v_proj]).
        gradient_checkpointing: recompute activations in backward (less memory, ~1/3 more compute); "selective":
            keep the outputs of the base's matrix products and of attention, recompute only the rest (memory
            between the two, compute near no checkpointing; `alignment.model.load.selective_checkpointing`).
        learning_rate: peak learning rate of the adapters (after warmup).
        weight_decay: AdamW's decoupled weight decay on the adapters.
        lr_scheduler: cosine or linear decay to 0 (or constant) after `warmup_ratio` / `warmup_steps`.
        warmup_ratio: share of the run's optimizer steps spent warming up linearly from 0.
        warmup_steps: warmup in optimizer steps; when > 0 it wins over `warmup_ratio`.
        optimizer: AdamW, or bitsandbytes' 8-bit AdamW (smaller optimizer state).
        beta: DPO's KL weight (every loss type's temperature), ORPO's odds-ratio weight (lambda in its paper),
            SimPO's reward scale (SimPO's default: 2.0), CPO's temperature.
        lean_logps: log-probs from the final hidden states, logits only at answer tokens and a chunk at a time
            (never the (2B, T, V) logits); false: full logits, then `sequence_logps` (the plain path).
        logits_chunk_size: answer tokens whose logits exist at once on the lean path; None: about 2**25 logits.
        padding_free: pack the batch's sequences into one row (positions restarting per sequence, attention kept
            within each): no compute on padding; the log-probs equal the padded forward's (`alignment.model.packing`).
            None: on where the method and its options allow it (not SFT, not DPO's ld_alpha or use_weighting), off
            elsewhere, said in one log line.
        shared_prompt: with padding_free, each pair's prompt packed once, both its answers attending to it: fewer
            tokens, the same log-probs (methods trained on pairs: DPO, ORPO, SimPO, CPO; needs sdpa attention).
            None: on where padding_free is and the method trains on pairs (off, in one log line, when the model's
            attention is not sdpa).
    """

    metric_names: list[str] = REWARD_METRICS
    data_kind: DataKind = "pairs"  # what its batches hold: pairs, single answers (SFT) or labelled answers (KTO)
    has_reference: bool = False  # a method that scores the reference model (DPO, KTO) sets it
    progress_metric: str = "rewards/accuracies"  # shown in the progress bar as acc / val_acc

    def __init__(
        self,
        base: str = TINY,
        revision: str | None = None,
        adapter: str | None = None,
        load_in_4bit: bool = True,
        compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        gradient_checkpointing: bool | Literal["selective"] = False,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        optimizer: Literal["adamw", "adamw_8bit"] = "adamw",
        beta: float = 0.1,
        lean_logps: bool = True,
        logits_chunk_size: int | None = None,
        padding_free: bool | None = None,
        shared_prompt: bool | None = None,
    ):
        super().__init__()
        _check(beta > 0, f"--model.beta must be > 0, got {beta}")
        _check(lora_r > 0, f"--model.lora_r must be > 0, got {lora_r}")
        _check(0 <= lora_dropout < 1, f"--model.lora_dropout must be in [0, 1), got {lora_dropout}")
        _check(learning_rate > 0, f"--model.learning_rate must be > 0, got {learning_rate}")
        _check(0 <= warmup_ratio < 1, f"--model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        _check(warmup_steps >= 0, f"--model.warmup_steps must be >= 0, got {warmup_steps}")
        _check(logits_chunk_size is None or logits_chunk_size > 0, "--model.logits_chunk_size must be > 0 or null")
        self.save_hyperparameters()
        # the resolved choices replace None in the hyper-parameters (what checkpoints and a resume compare)
        self.hparams.update(self._fast_path(padding_free, shared_prompt))
        self._shared_prompt_given = shared_prompt is not None
        self.starting_adapter: dict | None = None  # what names --model.adapter: the reference and a resume depend on it
        if adapter is not None:
            config = read_adapter(adapter, base, revision)
            self.hparams.update(_lora_of_adapter(self.hparams, config))
            self.starting_adapter = adapter_identity(adapter_weights(adapter), config)
        self.policy: PeftModel | None = None
        self.strict_loading = False  # checkpoints hold the adapters, not the base
        self.train_metrics = MeanTracker(self.metric_names)
        self.val_metrics = MeanTracker(self.metric_names)
        self._last_logged_step = -1
        self._lean_checked = False  # the lean path compared with the plain one on a first batch
        self._lean_refused = False  # the plain path for the rest of the run

    def padding_free_problem(self) -> str | None:
        """Why this method, with its options, cannot train on packed rows (None: it can). Read after the
        hyper-parameters are saved; methods override it."""
        return None

    def _fast_path(self, padding_free: bool | None, shared_prompt: bool | None) -> dict[str, bool]:
        """padding_free and shared_prompt as given, or, left out (None), on wherever they give the padded forward's
        log-probs. Set true where they cannot work: refused in one line."""
        why = self.padding_free_problem()
        _check(not (padding_free and why), f"--model.padding_free true: {why}; leave it out or set "
               "--model.padding_free false")  # fmt: skip
        packed = why is None if padding_free is None else padding_free
        why_shared = None
        if not packed:
            why_shared = "--model.shared_prompt needs --model.padding_free true"
        elif self.data_kind != "pairs":
            name = type(self).__name__
            why_shared = f"--model.shared_prompt: {name} does not train on pairs; it is for DPO, ORPO, SimPO, CPO"
        _check(not (shared_prompt and why_shared), str(why_shared))
        shared = why_shared is None if shared_prompt is None else shared_prompt
        if padding_free is None and why:
            log.info("padding_free off (%s): padded rows", why)
        return {"padding_free": packed, "shared_prompt": shared}

    # ---- model -------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.policy is not None:  # Lightning may call this more than once
            return
        hp = self.hparams
        device = self.trainer.strategy.root_device if self.attached else torch.device("cpu")
        dtype = hp.compute_dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        base = load_base(
            hp.base, revision=hp.revision, load_in_4bit=hp.load_in_4bit, compute_dtype=_DTYPES[dtype], device=device
        )
        if hp.adapter is not None:
            self.policy = load_lora(base, hp.adapter, reference=self.has_reference,
                                    gradient_checkpointing=hp.gradient_checkpointing)  # fmt: skip
            self._shared_prompt_needs_sdpa()
            return
        self.policy = add_lora(
            base,
            r=hp.lora_r,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            target_modules=hp.lora_target_modules,
            gradient_checkpointing=hp.gradient_checkpointing,
        )
        self._shared_prompt_needs_sdpa()

    def _shared_prompt_needs_sdpa(self) -> None:
        """shared_prompt left out is off on a model whose attention would not read the pairs' bounds (not sdpa)."""
        attention = packed_attention_problem(self.policy)
        if self.hparams.shared_prompt and not self._shared_prompt_given and attention:
            log.info("shared_prompt off (%s): each pair's prompt packed twice", attention)
            self.hparams.shared_prompt = False

    @property
    def attached(self) -> bool:
        """Whether a Trainer runs this module (not so under `load_from_checkpoint` alone)."""
        try:
            return self.trainer is not None
        except RuntimeError:  # Lightning: "... is not attached to a `Trainer`."
            return False

    @contextmanager
    def reference_model(self) -> Iterator[None]:
        """Inside, under no_grad and in eval mode (no dropout), the policy is the reference: the base with adapters
        disabled, or the frozen reference adapter when there is one (a copy of the adapter training started from;
        DPO's moving reference under sync_ref_model)."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                if REFERENCE_ADAPTER not in self.policy.peft_config:
                    with self.policy.disable_adapter():
                        yield
                    return
                # peft's set_adapter makes the adapter it activates trainable unless inference_mode is set, and
                # freezes the others: the policy's adapter is trainable again once it is set back
                self.policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
                try:
                    yield
                finally:
                    self.policy.set_adapter(POLICY_ADAPTER)
        finally:
            self.policy.train(was_training)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (2B, T, V)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The final hidden states (2B, T, H): the model without its LM head."""
        decoder = self.policy.get_base_model().get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def sequence_logps(self, batch: PreferenceBatch, *, average: bool) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) log-probs of the answers under the current model, each (B,)."""
        return self.row_logps(batch.input_ids, batch.attention_mask, batch.labels, average=average,
                              pairs=True).chunk(2)  # fmt: skip

    def row_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, average: bool,
                  pairs: bool = False) -> Tensor:  # fmt: skip
        """Log-probs (R,) of the labelled tokens of each of R rows (input_ids, attention_mask, labels (R, T)) under
        the current model: packed (padding_free; rows r and R/2 + r sharing their prompt when `pairs` and
        shared_prompt), or from the final hidden states (lean), or from full logits."""
        head = self._lean_head_weight(input_ids, attention_mask, labels)
        if self.hparams.padding_free:
            if pairs and self.hparams.shared_prompt:
                packed = pack_shared_prompts(input_ids, attention_mask, labels, ignore_index=IGNORE_INDEX)
            else:
                packed = pack_rows(input_ids, attention_mask, labels, ignore_index=IGNORE_INDEX)
            chunk = self.hparams.logits_chunk_size
            return packed_sequence_logps(self.policy, packed, head_weight=head, average=average, chunk_size=chunk,
                                         ignore_index=IGNORE_INDEX)  # fmt: skip
        if head is None:
            logits = self(input_ids, attention_mask)  # (R, T, V)
            return sequence_logps(logits[:, :-1], labels[:, 1:], average=average, ignore_index=IGNORE_INDEX)
        hidden = self.hidden_states(input_ids, attention_mask)  # (R, T, H)
        return sequence_logps_from_hidden(
            hidden[:, :-1], head, labels[:, 1:], average=average, ignore_index=IGNORE_INDEX,
            chunk_size=self.hparams.logits_chunk_size,
        )  # fmt: skip

    def _lean_head_weight(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                          labels: Tensor | None = None) -> Tensor | None:  # fmt: skip
        """The LM head's weight (V, H) when the lean path applies: on, an architecture known to have a plain head,
        and (checked once, on the first rows given) the same log-probs as the full-logits path; see
        alignment.model.heads."""
        if not self.hparams.lean_logps or self._lean_refused:
            return None
        model = self.policy.get_base_model()
        weight, why_not = plain_head_weight(model)
        if isinstance(weight, DTensor):  # a head sharded across processes (fsdp_qlora): gathered whole, frozen
            weight = weight.full_tensor()
        if weight is not None and input_ids is not None and not self._lean_checked:
            self._lean_checked = True
            why_not = lean_disagreement(model, weight, input_ids, attention_mask, labels[:, 1:],
                                        ignore_index=IGNORE_INDEX) or ""  # fmt: skip
            weight = None if why_not else weight
        if weight is None:
            log.warning("lean_logps: %s: %s; computing full logits", type(model).__name__, why_not)
            self._lean_refused = True
        return weight

    def compute_loss(self, batch: PreferenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss, per-example metrics (B,) keyed by `metric_names`) for a batch of `split`."""
        raise NotImplementedError

    # ---- steps ------------------------------------------------------------------------------------------------

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch, "train")
        self.train_metrics.update(metrics)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        _, metrics = self.compute_loss(batch, "validation")
        self.val_metrics.update(metrics)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = self._total_steps()
        warmup = hp.warmup_steps or math.ceil(hp.warmup_ratio * total)
        scheduler = get_scheduler(
            _SCHEDULE_NAMES[hp.lr_scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps in the whole run: the schedule's length.

        Lightning's `estimated_stepping_batches` builds the training loader before a checkpoint is restored, and
        the loader's saved position is then never loaded: a resumed run would start its epoch over.
        """
        trainer, datamodule = self.trainer, self.trainer.datamodule
        if not isinstance(datamodule, PreferenceDataModule) or datamodule.items("train") is None:
            return max(1, int(trainer.estimated_stepping_batches))
        batches, limit = len(datamodule.train_batch_sampler()), trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        total = math.inf
        if trainer.max_epochs not in (None, -1):
            total = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        if trainer.max_steps != -1:
            total = min(total, trainer.max_steps)
        _check(total != math.inf, "the learning-rate schedule needs --trainer.max_epochs or --trainer.max_steps")
        return max(1, int(total))

    # ---- logging ----------------------------------------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # log means over the optimizer steps since the last log (as TRL's logging_steps), synced across processes
        step = self.global_step
        if step == 0 or step == self._last_logged_step or step % self.trainer.log_every_n_steps != 0:
            return
        self._last_logged_step = step
        metrics = self.train_metrics.compute("train")
        self.train_metrics.reset()
        metrics["train/learning_rate"] = torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"])
        metrics["train/epoch"] = torch.tensor(
            self.current_epoch + (batch_idx + 1) / max(1, self.trainer.num_training_batches)
        )
        values = {k: v.item() for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=step)
        # short names: the progress bar truncates long ones
        shown = {"loss": "train/loss", "acc": f"train/{self.progress_metric}"}
        # Written where self.log would put them (callbacks and notebooks read trainer.callback_metrics; the bar
        # reads progress_bar_metrics), not through self.log: on a CPU it costs about 0.5 ms a value (it walks each
        # stored result to move it to the device), 7 ms a step for these 14, 8% of a tiny model's step.
        self.trainer.callback_metrics.update(metrics, **{short: metrics[name] for short, name in shown.items()})
        self.trainer.progress_bar_metrics.update({short: values[name] for short, name in shown.items()})

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics.empty:
            return
        metrics = self.val_metrics.compute("val")
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        # already synced by torchmetrics; sync_dist averages identical values, and keeps Lightning from warning
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        accuracy = metrics[f"val/{self.progress_metric}"]
        self.log("val_acc", accuracy, prog_bar=True, logger=False, on_step=False, on_epoch=True, sync_dist=True)

    # ---- adapter-only checkpoints -------------------------------------------------------------------------------

    def _adapter_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._adapter_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # before the weights load (a LoRA rank that differs would fail there, naming no setting); the rest of the
        # resume check is the run's (alignment.run.resume.ExactResume)
        stored = {k: v.shape for k, v in checkpoint["state_dict"].items()
                  if not k.startswith(("train_metrics.", "val_metrics."))}  # fmt: skip
        expected = {name: p.shape for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & stored.keys() if expected[k] != stored[k])
        if missing or unexpected or reshaped:
            saved = checkpoint.get("hyper_parameters") or {}
            changed = [f"model.{k}: {saved[k]!r} in the checkpoint, {self.hparams[k]!r} now" for k in _ADAPTER_SHAPE
                       if k in saved and saved[k] != self.hparams.get(k)]  # fmt: skip
            detail = "; ".join(changed) or (
                f"{len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}; "
                f"{len(reshaped)} of another shape, e.g. {reshaped[:2]}"
            )
            raise ConfigError(
                "the checkpoint's adapters do not match this model's (another base, LoRA rank or target modules?): "
                + detail
            )


def _lora_of_adapter(hparams, config: dict) -> dict:
    """The lora_* settings of the adapter training starts from, as its adapter_config.json (`config`) has them. A
    flag at its default is taken as not given; one given another value is a mistake, named."""
    defaults = inspect.signature(PreferenceModule.__init__).parameters
    settings = {}
    for flag, key in _ADAPTER_KEYS.items():
        value, given = config.get(key), hparams[flag]
        value = sorted(value) if isinstance(value, list) else value  # PEFT writes target modules as a set
        same = sorted(given) == value if isinstance(given, list) else given == value
        _check(same or given == defaults[flag].default,
               f"--model.{flag} {given} conflicts with --model.adapter {hparams.adapter}, whose adapter_config.json "
               f"has {key}: {value}; leave --model.{flag} out (the LoRA settings are the adapter's)")  # fmt: skip
        settings[flag] = value
    return settings


def answer_tokens(batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) counts of scored answer tokens, each (B,), at least 1: what `sequence_logps` divides
    the sums by for a mean."""
    return (batch.labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1).chunk(2)


def reward_metrics(
    losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    """The per-example (B,) metrics both methods log, named as in TRL's dashboards."""
    return {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
