"""CPO: a reference-free sigmoid preference loss plus the chosen answers' NLL."""

from __future__ import annotations

from torch import Tensor

from alignment.data import PreferenceBatch
from alignment.losses import chosen_nll, cpo_loss, label_smoothing_problem
from alignment.methods.base import REWARD_METRICS, PreferenceModule, Split, _check, answer_tokens, reward_metrics


class CPO(PreferenceModule):
    """Contrastive Preference Optimization (Xu et al. 2024, eq. 3 plus the NLL term of its final objective):
    -log sigmoid(beta * (logp_w - logp_l)) + cpo_alpha * NLL(chosen), on summed log-probs; no reference model.
    As TRL's CPO trainer with loss_type="sigmoid".

    Logged as TRL logs it: `logps/*` the summed log-probs, `rewards/*` beta times them, `nll_loss` the chosen
    answers' token-mean NLL.

    Args:
        beta: the temperature of the preference term (0.1, TRL's default).
        label_smoothing: assumed share of flipped labels (conservative, as TRL's).
        cpo_alpha: weight of the chosen answers' NLL (1.0, TRL's default and the paper's objective).
    """

    metric_names = REWARD_METRICS + ["nll_loss"]

    def __init__(self, *args, label_smoothing: float = 0.0, cpo_alpha: float = 1.0, **kwargs):
        problem = label_smoothing_problem(label_smoothing, flag="--model.")
        _check(problem is None, str(problem))
        _check(cpo_alpha >= 0, f"--model.cpo_alpha must be >= 0, got {cpo_alpha}")
        super().__init__(*args, **kwargs)

    def compute_loss(self, batch: PreferenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        chosen, rejected = self.sequence_logps(batch, average=False)  # sums (B,)
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen, rejected, beta=hp.beta, label_smoothing=hp.label_smoothing
        )
        nll = chosen_nll(chosen, answer_tokens(batch)[0])
        losses = losses + hp.cpo_alpha * nll
        metrics = reward_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        metrics["nll_loss"] = nll.detach()
        return losses.mean(), metrics
