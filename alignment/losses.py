"""Preference losses: pure functions of per-sequence log-probabilities.

Every input is (B,), every output is (B,); the caller reduces. Rewards are detached: they are
logged, never differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust"]


def _dpo_sigmoid(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # DPO, Rafailov et al. 2023, eq. 7; label smoothing as conservative DPO (Mitchell 2023)
    return -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing


def _dpo_robust(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # Robust DPO, Chowdhury et al. 2024, eq. 8: unbiased under a label flip rate of label_smoothing
    flipped = -F.logsigmoid(beta * margin) * (1 - label_smoothing) + F.logsigmoid(-beta * margin) * label_smoothing
    return flipped / (1 - 2 * label_smoothing)


def _dpo_hinge(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # SLiC-HF hinge, Zhao et al. 2023, eq. 3, with beta as the inverse margin scale
    return torch.relu(1 - beta * margin)


def _dpo_ipo(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO, Azar et al. 2023, eq. 17: regress the log-ratio margin onto 1 / (2 * tau), tau = beta
    return (margin - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
    "robust": _dpo_robust,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO family (Rafailov et al. 2023, eq. 7) on h = log pi/ref (chosen) - log pi/ref (rejected).

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards = beta * (policy - reference),
    the implicit reward of eq. 5 without its partition term.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, exact to the input's precision: Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))" (R's log1mexp, cutoff ln 2): log(-expm1(x)) for x > -ln 2, where 1 - e^x would cancel;
    log1p(-exp(x)) below, where e^x is small.

    Each branch sees an input clamped into its own range, so the branch that is not taken never makes an inf or a
    NaN (which `torch.where` would turn into a NaN gradient). x = 0, where the value is -inf, is defined as x =
    -tiny (the dtype's smallest normal number): a finite value, log(tiny) (-87.3 in float32, -708.4 in float64),
    and a zero gradient, as any x in [-tiny, 0]. Computes in at least float32.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype).clamp(max=-torch.finfo(dtype).tiny)
    near_zero = x > -math.log(2)
    cut = torch.full_like(x, -math.log(2))
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, cut))),  # input in (-ln 2, -tiny]
        torch.log1p(-torch.exp(torch.where(near_zero, cut, x))),  # input in [-inf, -ln 2]
    )


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1) -> tuple[Tensor, ...]:
    """Odds-ratio term of ORPO (Hong et al. 2024, eq. 4-7), on per-token MEAN logps.

    log odds(y) = log p - log(1 - p) with p = exp(mean logp), log(1 - p) by `log1mexp` (exact as mean logp -> 0);
    log_odds_chosen = log odds(chosen) - log odds(rejected); log_odds_ratio = log sigmoid(log_odds_chosen);
    or_losses = -beta * log_odds_ratio (>= 0), the term added to the chosen response's NLL.
    Returns (or_losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen), each (B,);
    rewards = beta * mean logps, detached.
    """
    log_odds_chosen = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    log_odds_ratio = F.logsigmoid(log_odds_chosen)
    or_losses = -beta * log_odds_ratio
    return (
        or_losses,
        beta * chosen_logps.detach(),
        beta * rejected_logps.detach(),
        log_odds_ratio.detach(),
        log_odds_chosen.detach(),
    )
