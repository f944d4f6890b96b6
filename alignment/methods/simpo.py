"""SimPO: a length-normalised, reference-free preference loss with a target reward margin."""

from __future__ import annotations

from torch import Tensor

from alignment.data import PreferenceBatch
from alignment.losses import chosen_nll, label_smoothing_problem, simpo_loss
from alignment.methods.base import REWARD_METRICS, PreferenceModule, Split, _check, answer_tokens, reward_metrics


class SimPO(PreferenceModule):
    """Simple Preference Optimization (Meng et al. 2024, eq. 6): -log sigmoid(beta * (mean logp_w - mean logp_l)
    - gamma) on per-token MEAN log-probs; no reference model. As TRL's CPO trainer with loss_type="simpo".

    Logged as TRL logs it: `logps/*` the per-token mean log-probs, `rewards/*` beta times them, `nll_loss` the
    chosen answers' token-mean NLL (whatever `cpo_alpha`; TRL logs 0 when it is 0).

    Args:
        beta: the reward scale, 2.0 (TRL's CPOConfig defaults to 0.1 for every loss type; SimPO wants about 2).
        gamma: the target reward margin, in reward units (TRL's simpo_gamma, default 0.5).
        label_smoothing: assumed share of flipped labels (conservative, as TRL's).
        cpo_alpha: weight of the chosen answers' NLL added to the loss; 0: SimPO (TRL's default is 1.0, which
            makes its "simpo" CPO-SimPO unless set to 0).
    """

    metric_names = REWARD_METRICS + ["nll_loss"]

    def __init__(
        self, *args, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0, cpo_alpha: float = 0.0,
        **kwargs,
    ):  # fmt: skip
        problem = label_smoothing_problem(label_smoothing, flag="--model.")
        _check(problem is None, str(problem))
        _check(cpo_alpha >= 0, f"--model.cpo_alpha must be >= 0, got {cpo_alpha}")
        super().__init__(*args, beta=beta, **kwargs)

    def compute_loss(self, batch: PreferenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        chosen_sums, rejected_sums = self.sequence_logps(batch, average=False)  # (B,)
        chosen_tokens, rejected_tokens = answer_tokens(batch)
        chosen, rejected = chosen_sums / chosen_tokens, rejected_sums / rejected_tokens  # per-token means (B,)
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen, rejected, beta=hp.beta, gamma=hp.gamma, label_smoothing=hp.label_smoothing
        )
        nll = chosen_nll(chosen_sums, chosen_tokens)
        losses = losses + hp.cpo_alpha * nll
        metrics = reward_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        metrics["nll_loss"] = nll.detach()
        return losses.mean(), metrics
