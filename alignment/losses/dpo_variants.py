"""What TRL 1.16's DPOConfig adds around a DPO loss type: f-divergence scores (f-DPO), length-desensitized log-probs
(LD-DPO) and WPO's pair weights. Pure functions of log-prob tensors, as the losses."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

FDivergenceType = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(logratios: Tensor, f_divergence_type: FDivergenceType, alpha: float = 0.5) -> Tensor:
    """f'(u) at u = pi / pi_ref = exp(logratios), the score whose chosen-minus-rejected difference replaces the
    log-ratio margin in f-DPO (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240, Theorem 1; constants that
    cancel in the difference dropped):

        reverse_kl  log u                (DPO itself)
        forward_kl  1 - 1/u
        js_divergence  log 2 + log sigmoid(log u)  (= log(2u / (1 + u)))
        alpha_divergence  (u^(alpha - 1) - 1) / (alpha - 1), log u at alpha = 1

    `alpha` is TRL's `f_alpha_divergence_coef` (TRL writes the alpha-divergence with u^(alpha - 1); the paper's alpha
    is 1 - this one). As TRL, (alpha - 1) log u is clamped at 11 in float16 and 80 otherwise before exp, so the score
    stays finite (and its gradient is 0 past the clamp). (B,) -> (B,).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is reverse KL
            return logratios
        exponent = (alpha - 1.0) * logratios
        dtype = torch.promote_types(exponent.dtype, torch.float32)
        exponent = exponent.to(dtype).clamp(max=11.0 if logratios.dtype == torch.float16 else 80.0)
        return (torch.expm1(exponent) / (alpha - 1.0)).to(logratios.dtype)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose one of {list(F_DIVERGENCES)}")


def ld_token_weights(answer_mask: Tensor, ld_alpha: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """LD-DPO's token weights (Liu et al. 2024, "Length Desensitization in DPO", arXiv:2409.06411, eq. 9): 1 on the
    first min(|y_w|, |y_l|) answer tokens of both answers of a pair, `ld_alpha` on the longer answer's tokens past
    that length, 0 off the answers. The weighted sum of token log-probs is the desensitized log-prob:
    shared + ld_alpha * verbose. answer_mask (2B, T): chosen rows then rejected rows; returns (2B, T) in `dtype`
    (that of the log-probs: ld_alpha is rounded to it)."""
    position = answer_mask.long().cumsum(dim=1)  # (2B, T) 1-based index of each answer token
    chosen_lengths, rejected_lengths = answer_mask.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2)[:, None]  # (2B, 1)
    in_shared = answer_mask & (position <= shared)
    in_tail = answer_mask & (position > shared)
    return in_shared.to(dtype) + ld_alpha * in_tail.to(dtype)


def wpo_pair_weights(token_logps: Tensor, token_log_sum_sq_probs: Tensor, answer_mask: Tensor) -> Tensor:
    """WPO's weight of each pair (Zhou et al. 2024, arXiv:2406.11827, eq. 2 with the aligned probabilities of its
    sec. 3.2, as TRL 1.16 computes it): w(y) = exp(mean over y's tokens of log p_t - log sum_v p_v^2), the
    length-normalized probability of y relative to the policy's own sampling; a pair weighs w(y_w) * w(y_l).

    token_logps, token_log_sum_sq_probs (log sum_v p(v)^2 at each position) and answer_mask: (2B, T), chosen rows
    then rejected rows, from the policy. Returns (B,), detached: the weights scale the loss, never take gradients.
    """
    mask = answer_mask.to(token_logps.dtype)
    aligned = ((token_logps - token_log_sum_sq_probs).detach() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    chosen_weights, rejected_weights = torch.exp(aligned).chunk(2)
    return chosen_weights * rejected_weights
