"""DPO: preference optimization against a frozen reference, whose log-probs come from a cache."""

from __future__ import annotations

import torch
from torch import Tensor

from alignment.data import PreferenceBatch
from alignment.losses import (
    MEAN_LOGPS_LOSSES,
    DPOLossType,
    RunningMean,
    chosen_nll,
    dpo_loss,
    label_smoothing_problem,
    rpo_loss,
)
from alignment.methods.base import REWARD_METRICS, PreferenceModule, Split, _check, answer_tokens, reward_metrics
from alignment.methods.reference import ReferenceScorer


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
        *args,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float = 0.0,
        discopop_tau: float = 0.05,
        reference_cache: bool = True,
        reference_cache_dir: str | None = None,
        **kwargs,
    ):
        problem = label_smoothing_problem(label_smoothing, loss_type, flag="--model.")
        _check(problem is None, str(problem))
        _check(rpo_alpha >= 0, f"--model.rpo_alpha must be >= 0, got {rpo_alpha}")
        _check(discopop_tau > 0, f"--model.discopop_tau must be > 0, got {discopop_tau}")
        super().__init__(*args, **kwargs)  # the base's save_hyperparameters() records these too
        self.reward_mean = RunningMean()  # bco_pair's reward shift: state for an exact resume
        self.reference = ReferenceScorer(self, cache=reference_cache, cache_dir=reference_cache_dir)

    @property
    def metric_names(self) -> list[str]:  # read by the base's __init__, after save_hyperparameters()
        return REWARD_METRICS + (["nll_loss"] if self.hparams.rpo_alpha > 0 else [])

    def compute_loss(self, batch: PreferenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        policy_chosen, policy_rejected = self.sequence_logps(batch, average=False)  # sums, each (B,)
        ref_chosen, ref_rejected = self.reference.logps(batch, average=False, split=split)
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
        self.reference.prepare()

    def on_fit_end(self) -> None:
        self.reference.finish()
