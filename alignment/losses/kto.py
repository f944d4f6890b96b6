"""KTO's loss: pure functions of per-sequence log-probabilities, as those of `alignment.losses`.

Every per-example input and output is (B,); the caller reduces. Rewards are detached.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kto_kl_estimate(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """The batch's estimate of KL(policy || reference), before clamping: the mean log-ratio log pi(y'|x) -
    log pi_ref(y'|x) over B mismatched pairs (x, y'), y' the answer of another example (Ethayarajh et al. 2024,
    sec. 4.1, the reference point z_0). Inputs (B,) summed log-probs; returns a detached scalar."""
    return (policy_kl_logps - reference_kl_logps).mean().detach()


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, sec. 4.1): L = lambda_y - v(x, y) per example, with r = log pi(y|x) -
    log pi_ref(y|x), z_0 = max(kl, 0) (detached) and

        v = lambda_D * sigmoid(beta * (r - z_0))   for a desirable y,
        v = lambda_U * sigmoid(beta * (z_0 - r))   for an undesirable y,

    so losses = lambda_D * (1 - sigmoid(beta * (r - z_0))) or lambda_U * (1 - sigmoid(beta * (z_0 - r))), as TRL's
    KTOTrainer (loss_type "kto") computes them; the caller takes their mean over the batch.

    Args:
        policy_logps, reference_logps: (B,) summed log-probs of each example's own answer.
        desirable: (B,) bool, the labels.
        kl: scalar, the batch's mean log-ratio on mismatched pairs (`kto_kl_estimate`, averaged over processes).

    Returns (losses, rewards, z_0): losses and rewards = beta * r (detached) are (B,), z_0 the clamped reference
    point (scalar).
    """
    z_0 = kl.detach().clamp(min=0)
    logratios = policy_logps - reference_logps  # (B,)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z_0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z_0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach(), z_0


def apo_zero_unpaired_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """APO-zero on unpaired answers (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7 split by answer, as TRL 1.16's
    KTOTrainer loss_type "apo_zero_unpaired"): with r = log pi(y|x) - log pi_ref(y|x),

        losses = lambda_D * (1 - sigmoid(beta * r))   for a desirable y (its likelihood raised),
        losses = lambda_U * sigmoid(beta * r)         for an undesirable y (lowered),

    KTO's loss with the reference point z_0 fixed at 0: no KL estimate. Inputs (B,); returns (losses, rewards), each
    (B,), rewards = beta * r (detached)."""
    logratios = policy_logps - reference_logps  # (B,)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * logratios))
    undesirable_losses = undesirable_weight * torch.sigmoid(beta * logratios)
    return torch.where(desirable, desirable_losses, undesirable_losses), beta * logratios.detach()


def weights_advice(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str:
    """A warning ('' when none is due) when the weights do not balance unequal counts of desirable and undesirable
    examples: Ethayarajh et al. 2024, sec. 4.1 (eq. 8) recommend lambda_D n_D / (lambda_U n_U) in [1, 4/3]; the
    ranges are those TRL's KTOTrainer prints, for one weight with the other kept."""
    n_desirable, n_undesirable = max(n_desirable, 1), max(n_undesirable, 1)
    if n_desirable == n_undesirable:
        return ""
    balanced_desirable = n_undesirable * undesirable_weight / n_desirable  # lambda_D that makes the ratio 1
    balanced_undesirable = n_desirable * desirable_weight / n_undesirable
    desirable_range = round(balanced_desirable, 2), round(balanced_desirable * 1.33, 2)
    undesirable_range = round(balanced_undesirable / 1.33, 2), round(balanced_undesirable, 2)
    if desirable_range[0] <= desirable_weight <= desirable_range[1]:
        return ""
    if undesirable_range[0] <= undesirable_weight <= undesirable_range[1]:
        return ""
    return (
        f"KTO: {n_desirable} desirable and {n_undesirable} undesirable training examples, and the weights do not "
        f"balance them (lambda_D * n_D / (lambda_U * n_U) should be in [1, 4/3]): set EITHER --model.desirable_weight "
        f"in [{desirable_range[0]}, {desirable_range[1]}] OR --model.undesirable_weight in "
        f"[{undesirable_range[0]}, {undesirable_range[1]}], not both"
    )
