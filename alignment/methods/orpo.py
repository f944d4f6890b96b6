"""ORPO: the chosen answer's NLL plus an odds-ratio penalty; no reference model."""

from __future__ import annotations

from torch import Tensor

from alignment.data import PreferenceBatch
from alignment.losses import orpo_loss
from alignment.methods.base import REWARD_METRICS, PreferenceModule, Split, reward_metrics


class ORPO(PreferenceModule):
    """Odds Ratio Preference Optimization (Hong et al. 2024, eq. 6): NLL of the chosen answer + beta * L_OR.

    No reference model. `beta` is the paper's lambda.
    """

    metric_names = REWARD_METRICS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"]

    def compute_loss(self, batch: PreferenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.sequence_logps(batch, average=True)  # per-token mean logps (B,)
        or_losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_loss(
            chosen, rejected, beta=self.hparams.beta
        )
        nll = -chosen  # per-token NLL of each chosen answer, averaged per sequence (the paper's L_SFT)
        losses = nll + or_losses
        metrics = reward_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        metrics.update(nll_loss=nll.detach(), log_odds_ratio=log_odds_ratio, log_odds_chosen=log_odds_chosen)
        return losses.mean(), metrics
