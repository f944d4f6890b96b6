"""DPO: preference optimization against a frozen reference, whose log-probs come from a cache."""

from __future__ import annotations

import logging
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from alignment.data import IGNORE_INDEX, PreferenceBatch, PreferenceDataModule
from alignment.hub import resolve_base
from alignment.losses import MEAN_LOGPS_LOSSES, DPOLossType, RunningMean, chosen_nll, dpo_loss, rpo_loss
from alignment.methods.base import REWARD_METRICS, PreferenceModule, Split, _check, answer_tokens, reward_metrics
from alignment.reference import (
    ReferenceCache,
    ReferencePassStopped,
    Tables,
    filled,
    reference_tables,
    save_added_rows,
    train_pairs_read,
    weights_identity,
)
from alignment.tiny import TINY

log = logging.getLogger(__name__)


class DPO(PreferenceModule):
    """Direct Preference Optimization (Rafailov et al. 2023); the reference is the base with adapters off, or the
    adapter training started from (`adapter`), frozen.

    Logged as TRL's DPOTrainer logs, for every loss_type: `logps/*` the policy's log-probs summed over tokens,
    `rewards/*` beta * (policy - reference) of those sums. IPO's loss alone takes per-token means (as TRL's), so its
    logged accuracies and margins are not the loss's: a short chosen answer can win on means and lose on sums.
    With `rpo_alpha` > 0 it also logs `nll_loss`, the chosen answers' token-mean NLL.

    Args:
        loss_type: a name in `alignment.losses.DPO_LOSSES`: sigmoid (DPO), hinge (SLiC), ipo (IPO, its loss on
            per-token mean logps), robust (rDPO), bco_pair (BCO, its reward shift the running mean of the training
            rewards, kept in the checkpoint), sppo_hard (SPPO), nca_pair (NCA), apo_zero / apo_down (APO), aot (AOT,
            paired), exo_pair (EXO, needs label_smoothing > 0) or discopop (DiscoPOP).
        label_smoothing: assumed share of flipped labels (conservative DPO for sigmoid and aot, rDPO for robust,
            EXO's epsilon for exo_pair); ignored by the others.
        rpo_alpha: weight of the chosen answers' NLL added to the loss (RPO, Pang et al. 2024); 0: none.
        discopop_tau: DiscoPOP's temperature (0.05 in its paper).
        reference_cache: compute the reference log-probs once before training and keep them on disk for later
            runs on the same model and data (a short run computes only the pairs its steps read, a longer one adds
            the rest); false: a reference forward in every step.
        reference_cache_dir: where the cache lives; None: `reference/` in the alignment cache
            (`$ALIGNMENT_CACHE`, default ~/.cache/alignment).
    """

    has_reference = True

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
        padding_free: bool = False,
        shared_prompt: bool = False,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float = 0.0,
        discopop_tau: float = 0.05,
        reference_cache: bool = True,
        reference_cache_dir: str | None = None,
    ):
        _check(0 <= label_smoothing < 0.5, f"--model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        _check(loss_type != "exo_pair" or label_smoothing > 0,
               "--model.loss_type exo_pair needs --model.label_smoothing > 0 (the EXO paper uses 1e-3)")  # fmt: skip
        _check(rpo_alpha >= 0, f"--model.rpo_alpha must be >= 0, got {rpo_alpha}")
        _check(discopop_tau > 0, f"--model.discopop_tau must be > 0, got {discopop_tau}")
        # the base's save_hyperparameters() records this signature's every argument
        super().__init__(
            base=base, revision=revision, adapter=adapter, load_in_4bit=load_in_4bit, compute_dtype=compute_dtype,
            lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target_modules=lora_target_modules,
            gradient_checkpointing=gradient_checkpointing, learning_rate=learning_rate, weight_decay=weight_decay,
            lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps, optimizer=optimizer,
            beta=beta, lean_logps=lean_logps, logits_chunk_size=logits_chunk_size, padding_free=padding_free,
            shared_prompt=shared_prompt,
        )  # fmt: skip
        self.reward_mean = RunningMean()  # bco_pair's reward shift: state for an exact resume
        self._reference: Tables = {}  # split -> (N, 4) cached reference log-probs, filled in on_fit_start
        self._reference_key: str | None = None  # the cache entry they belong to
        self._rows_added: dict[str, list[Tensor]] = {}  # split -> positions computed in the steps, to write back

    @property
    def metric_names(self) -> list[str]:  # read by the base's __init__, after save_hyperparameters()
        return REWARD_METRICS + (["nll_loss"] if self.hparams.rpo_alpha > 0 else [])

    def reference_logps(
        self, batch: PreferenceBatch, *, average: bool, split: Split = "train"
    ) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) log-probs under the reference: from the cache when it holds `split`, else a forward
        of the reference model."""
        table = self._reference.get(split)
        if table is None:
            with self.reference_model():
                return self.sequence_logps(batch, average=average)
        index = batch.index.cpu()
        missing = ~filled(table[index])
        if missing.any():  # rows the pass left out: computed here, once, as the pass computes them
            self._compute_rows(split, index[missing])
        rows = table[index].to(self.device)  # (B, 4)
        chosen, rejected, chosen_tokens, rejected_tokens = rows.unbind(1)
        if average:  # as sequence_logps(average=True) divides
            return chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        return chosen, rejected

    def _compute_rows(self, split: Split, positions: Tensor) -> None:
        datamodule = self.trainer.datamodule
        items = datamodule.items(split)
        values = self._reference_pass([items[i] for i in positions.tolist()], collate=datamodule.collate)
        self._reference[split][positions] = torch.stack([t.float().cpu() for t in values], dim=1)
        self._rows_added.setdefault(split, []).append(positions)

    def compute_loss(self, batch: PreferenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        policy_chosen, policy_rejected = self.sequence_logps(batch, average=False)  # sums, each (B,)
        ref_chosen, ref_rejected = self.reference_logps(batch, average=False, split=split)
        chosen_tokens, rejected_tokens = answer_tokens(batch)
        logps = policy_chosen, policy_rejected, ref_chosen, ref_rejected
        if hp.loss_type in MEAN_LOGPS_LOSSES:  # IPO's loss is on per-token means, as TRL's (Azar et al. 2023, eq. 17)
            logps = (policy_chosen / chosen_tokens, policy_rejected / rejected_tokens,
                     ref_chosen / chosen_tokens, ref_rejected / rejected_tokens)  # fmt: skip
        # logged as TRL logs them, for every loss type: rewards of sums (the same as dpo_loss's but for IPO)
        chosen_rewards = hp.beta * (policy_chosen - ref_chosen).detach()
        rejected_rewards = hp.beta * (policy_rejected - ref_rejected).detach()
        losses, _, _ = dpo_loss(
            *logps, beta=hp.beta, loss_type=hp.loss_type, label_smoothing=hp.label_smoothing,
            discopop_tau=hp.discopop_tau, reward_shift=self._reward_shift(chosen_rewards, rejected_rewards, split),
        )  # fmt: skip
        metrics = reward_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        if hp.rpo_alpha > 0:
            nll = chosen_nll(policy_chosen, chosen_tokens)
            losses = rpo_loss(losses, nll, hp.rpo_alpha)
            metrics.update(loss=losses.detach(), nll_loss=nll.detach())
        return losses.mean(), metrics

    def _reward_shift(self, chosen_rewards: Tensor, rejected_rewards: Tensor, split: Split) -> float:
        """bco_pair's delta (Jung et al. 2024): the mean of every training reward so far, this batch's included, over
        all processes; validation reads it without adding to it. 0 for the other loss types."""
        if self.hparams.loss_type != "bco_pair":
            return 0.0
        if split == "train":
            gather = self.all_gather if self.attached and self.trainer.world_size > 1 else None
            self.reward_mean.update(torch.cat([chosen_rewards, rejected_rewards]), gather=gather)
        return self.reward_mean.mean

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reward_mean"] = self.reward_mean.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "reward_mean" in checkpoint:
            self.reward_mean.load_state_dict(checkpoint["reward_mean"])

    def on_fit_start(self) -> None:
        self._reference, self._rows_added = {}, {}
        datamodule = self.trainer.datamodule
        if not self.hparams.reference_cache:
            return
        if not isinstance(datamodule, PreferenceDataModule):
            log.warning("reference cache off: it needs a PreferenceDataModule; the reference runs in every step")
            return
        splits = {split: items for split in ("train", "validation") if (items := datamodule.items(split)) is not None}
        train = train_pairs_read(self.trainer, datamodule.train_batch_sampler())
        # a short run: the pairs its steps read; validation rows as validation reads them (it may never run)
        needed = {"train": train, "validation": None if train is None else []}
        try:
            self._reference_key, self._reference = reference_tables(
                self.trainer,
                splits,
                partial(self._reference_pass, collate=datamodule.collate),
                identity=self._reference_identity(),
                digests={split: datamodule.digest(split) for split in splits},
                cache_dir=self.hparams.reference_cache_dir,
                batch_size=datamodule.eval_batch_size,
                needed=needed,
            )
        except ReferencePassStopped as stop:
            if self.trainer.is_global_zero:
                log.warning("stopped by %s during the reference pass; the rows computed are kept in the cache and "
                            "a rerun continues from them", stop.signal_name)  # fmt: skip
            raise SystemExit(stop.exit_code) from None

    def on_fit_end(self) -> None:
        self._save_rows_added()
        self._reference = {}  # a later validate() may read other data

    def _save_rows_added(self) -> None:
        """Write the rows computed during the steps into the cache entry."""
        if self._reference and self._reference_key is not None:
            added = {s: torch.cat(p) for s, p in self._rows_added.items()}
            save_added_rows(self.trainer, ReferenceCache(self.hparams.reference_cache_dir), self._reference_key,
                            self._reference, added, meta=self._reference_identity())  # fmt: skip
        self._rows_added = {}

    def _reference_identity(self) -> dict:
        """What, besides the token ids, changes the reference log-probs."""
        hp = self.hparams
        identity = {
            "weights": weights_identity(resolve_base(hp.base, hp.revision), hp.revision),
            "load_in_4bit": hp.load_in_4bit,
            "quantization": "nf4+double-quant",
            "compute_dtype": str(self.policy.get_base_model().dtype),
            "device": self.device.type,
            "precision": str(self.trainer.precision),
        }
        if self.starting_adapter is not None:  # the reference is that adapter: an entry of the bare base is never read
            identity["adapter"] = self.starting_adapter
        return identity

    @torch.no_grad()
    def _reference_pass(self, pairs: list, collate) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reference log-probs (summed) of the two answers of each item (chosen and rejected; for KTO, completion
        and KL completion), and their token counts."""
        collated = collate(pairs)  # a PreferenceBatch, or KTO's UnpairedBatch: two answer rows per item
        batch = type(collated)(*(t.to(self.device) for t in collated))
        with self.trainer.precision_plugin.forward_context(), self.reference_model():  # eval: no dropout
            chosen, rejected = self.sequence_logps(batch, average=False)
        chosen_tokens, rejected_tokens = (batch.labels != IGNORE_INDEX).sum(-1).chunk(2)
        return chosen, rejected, chosen_tokens, rejected_tokens
