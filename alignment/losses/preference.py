"""Preference losses: pure functions of per-sequence log-probabilities.

Every input is (B,), every output is (B,); the caller reduces. Rewards are detached: they are
logged, never differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.losses.dpo_variants import F_DIVERGENCES, FDivergenceType, f_divergence_score

DPOLossType = Literal[
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down", "aot",
    "exo_pair", "discopop", "aot_unpaired", "sft", "sigmoid_norm",
]  # fmt: skip

# Loss types on per-token MEAN log-ratios, as TRL 1.16's DPOTrainer computes them (IPO's loss divides the summed
# log-ratios by the answer lengths): give them means, or sums with `chosen_tokens` / `rejected_tokens`, which they
# divide by (what the DPO module does: an f-divergence score is then taken of the sums, as TRL's). sigmoid_norm
# divides the same way but needs the token counts; the other loss types take per-sequence sums.
MEAN_LOGPS_LOSSES = frozenset({"ipo"})
# Loss types that read only the chosen-minus-rejected score difference, the only ones f-DPO generalizes (Wang et al.
# 2023: the partition term cancels there alone); TRL 1.16 refuses another f_divergence_type for the others.
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
# Loss types that sort the batch (loss i is a quantile's, not pair i's): WPO's per-pair weights would be misaligned.
SORTING_LOSSES = frozenset({"aot", "aot_unpaired"})


class PairLogps(NamedTuple):
    """Per-sequence log-probs of a batch of pairs, each (B,)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    # answer lengths (B,), what ipo and sigmoid_norm divide by and sft averages over; None: 1 each
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None
    # the policy's chosen log-probs summed over every answer token, what sft reads (policy_chosen is LD-weighted
    # under ld_alpha); None: policy_chosen
    policy_chosen_full: Tensor | None = None

    @property
    def chosen_logratios(self) -> Tensor:  # (B,) log pi/ref of the chosen answers
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:  # (B,)
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> Tensor:  # (B,) h = log pi/ref (chosen) - log pi/ref (rejected)
        return self.chosen_logratios - self.rejected_logratios


@dataclass(frozen=True)
class LossKnobs:
    """What a DPO-family loss reads besides the log-probs."""

    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    reward_shift: float | Tensor = 0.0  # bco_pair's delta
    f_divergence_type: FDivergenceType = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5


def _score_margin(logps: PairLogps, k: LossKnobs, *, per_token: bool = False) -> Tensor:
    """f'(pi/ref) of the chosen minus f'(pi/ref) of the rejected answer (the log-ratio margin h under reverse KL,
    f-DPO otherwise: `f_divergence_score`); each score divided by its answer's length when `per_token`. (B,)."""
    chosen = f_divergence_score(logps.chosen_logratios, k.f_divergence_type, k.f_alpha_divergence_coef)
    rejected = f_divergence_score(logps.rejected_logratios, k.f_divergence_type, k.f_alpha_divergence_coef)
    if per_token and logps.chosen_tokens is not None:
        chosen = chosen / logps.chosen_tokens.clamp(min=1)
    if per_token and logps.rejected_tokens is not None:
        rejected = rejected / logps.rejected_tokens.clamp(min=1)
    return chosen - rejected


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    # conservative DPO (Mitchell 2023): the label is flipped with probability label_smoothing
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def _dpo_sigmoid(logps: PairLogps, k: LossKnobs) -> Tensor:
    """DPO, Rafailov et al. 2023, eq. 7, with conservative-DPO label smoothing."""
    return _smoothed_sigmoid(k.beta * _score_margin(logps, k), k.label_smoothing)


def _dpo_robust(logps: PairLogps, k: LossKnobs) -> Tensor:
    """Robust DPO, Chowdhury et al. 2024, eq. 8: unbiased under a label flip rate of label_smoothing."""
    eps, logits = k.label_smoothing, k.beta * _score_margin(logps, k)
    return (-F.logsigmoid(logits) * (1 - eps) + F.logsigmoid(-logits) * eps) / (1 - 2 * eps)


def _dpo_hinge(logps: PairLogps, k: LossKnobs) -> Tensor:
    """SLiC-HF hinge, Zhao et al. 2023, eq. 3, with beta as the inverse margin scale."""
    return torch.relu(1 - k.beta * _score_margin(logps, k))


def _dpo_ipo(logps: PairLogps, k: LossKnobs) -> Tensor:
    """IPO, Azar et al. 2023, eq. 17: regress the log-ratio margin onto 1 / (2 * tau), tau = beta, on per-token
    means (means given, or sums divided by the token counts)."""
    return (_score_margin(logps, k, per_token=True) - 1 / (2 * k.beta)) ** 2


def _bco_pair(logps: PairLogps, k: LossKnobs) -> Tensor:
    """BCO on pairs, Jung et al. 2024 (arXiv:2404.04656), sec. 3: a binary classifier whose logit is the implicit
    reward minus the reward shift delta, chosen labelled 1 and rejected 0: -log s(r_w - delta) - log s(-(r_l - delta)).
    TRL 1.16 uses delta = 0; `RunningMean` gives the paper's delta, the running mean of the rewards."""
    chosen_rewards, rejected_rewards = k.beta * logps.chosen_logratios, k.beta * logps.rejected_logratios
    return -F.logsigmoid(chosen_rewards - k.reward_shift) - F.logsigmoid(-(rejected_rewards - k.reward_shift))


def _sppo_hard(logps: PairLogps, k: LossKnobs) -> Tensor:
    """SPPO, Wu et al. 2024 (arXiv:2405.00675), eq. 4.7 with hard win probabilities (1 chosen, 0 rejected):
    log-ratios regressed onto +1/(2 beta) and -1/(2 beta)."""
    target = 0.5 / k.beta
    return (logps.chosen_logratios - target) ** 2 + (logps.rejected_logratios + target) ** 2


def _nca_pair(logps: PairLogps, k: LossKnobs) -> Tensor:
    """NCA, Chen et al. 2024 (arXiv:2402.05369), its pairwise loss: -log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l),
    r = beta * log pi/ref (absolute rewards, not only their margin)."""
    chosen_rewards, rejected_rewards = k.beta * logps.chosen_logratios, k.beta * logps.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def _apo_zero(logps: PairLogps, k: LossKnobs) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 7: raise the chosen likelihood, lower the
    rejected one (for chosen answers better than the model's own)."""
    return (1 - torch.sigmoid(k.beta * logps.chosen_logratios)) + torch.sigmoid(k.beta * logps.rejected_logratios)


def _apo_down(logps: PairLogps, k: LossKnobs) -> Tensor:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 8: lower both likelihoods, the rejected one more
    (for chosen answers worse than the model's own)."""
    return torch.sigmoid(k.beta * logps.chosen_logratios) + (1 - torch.sigmoid(k.beta * logps.margin))


def _aot(logps: PairLogps, k: LossKnobs) -> Tensor:
    """AOT (paired), Melnyk et al. 2024 (arXiv:2406.05882): first-order stochastic dominance of the policy's
    chosen-minus-rejected log-ratios over the reference's, by matching their sorted batch values (the optimal
    transport plan in 1-D) under the smoothed sigmoid loss. Loss i is the i-th quantile's, not pair i's."""
    policy_sorted, _ = torch.sort(logps.policy_chosen - logps.policy_rejected, dim=0)
    ref_sorted, _ = torch.sort(logps.ref_chosen - logps.ref_rejected, dim=0)
    return _smoothed_sigmoid(k.beta * (policy_sorted - ref_sorted), k.label_smoothing)


def _exo_pair(logps: PairLogps, k: LossKnobs) -> Tensor:
    """EXO, Ji et al. 2024 (arXiv:2402.00856), eq. 16 with K = 2: KL(p_policy || p_label) between
    p_policy = (s(beta h), s(-beta h)) and the smoothed labels p_label = (1 - eps, eps), eps = label_smoothing."""
    eps, logits = k.label_smoothing, k.beta * _score_margin(logps, k)
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps))
    return chosen_term + rejected_term


def _discopop(logps: PairLogps, k: LossKnobs) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), Chris Lu et al. 2024 (arXiv:2406.08414), eq. 5: a blend of the logistic
    loss and the exponential loss exp(-beta h), weighted by s(beta h / tau)."""
    logits = k.beta * _score_margin(logps, k)
    exp_weight = torch.sigmoid(logits / k.discopop_tau)
    return -F.logsigmoid(logits) * (1 - exp_weight) + torch.exp(-logits) * exp_weight


def _aot_unpaired(logps: PairLogps, k: LossKnobs) -> Tensor:
    """AOT (unpaired), Melnyk et al. 2024 (arXiv:2406.05882): the chosen log-ratios' distribution made to dominate the
    rejected ones', by matching their sorted batch values, under the smoothed sigmoid loss. Loss i is the i-th
    quantile's."""
    chosen_sorted, _ = torch.sort(logps.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(logps.rejected_logratios, dim=0)
    return _smoothed_sigmoid(k.beta * (chosen_sorted - rejected_sorted), k.label_smoothing)


def _sft(logps: PairLogps, k: LossKnobs) -> Tensor:
    """The chosen answers' NLL, -sum of their token log-probs / their token count over the batch (the SFT term of
    MPO, Wang et al. 2024, arXiv:2411.10442, and of RPO), each pair holding that batch value, as TRL 1.16's "sft"."""
    chosen = logps.policy_chosen if logps.policy_chosen_full is None else logps.policy_chosen_full
    tokens = torch.ones_like(chosen) if logps.chosen_tokens is None else logps.chosen_tokens
    return (-chosen.sum() / tokens.sum().clamp(min=1)).expand(chosen.shape[0])


def _sigmoid_norm(logps: PairLogps, k: LossKnobs) -> Tensor:
    """DPO on length-normalized log-ratios: -log s(beta * (h_w / |y_w| - h_l / |y_l|)), as TRL 1.16's "sigmoid_norm"
    (the per-token implicit reward of SimPO, Meng et al. 2024, eq. 4, kept relative to the reference)."""
    return -F.logsigmoid(k.beta * _score_margin(logps, k, per_token=True))


DPO_LOSSES: dict[str, Callable[[PairLogps, LossKnobs], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
    "robust": _dpo_robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "nca_pair": _nca_pair,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "aot": _aot,
    "exo_pair": _exo_pair,
    "discopop": _discopop,
    "aot_unpaired": _aot_unpaired,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}


def label_smoothing_problem(label_smoothing: float, loss_type: str | None = None, *, flag: str = "") -> str | None:
    """What is wrong with `label_smoothing` (an assumed share of flipped labels) for `loss_type`, or None; `flag`
    prefixes the settings' names (`--model.`)."""
    if not 0 <= label_smoothing < 0.5:
        return f"{flag}label_smoothing must be in [0, 0.5), got {label_smoothing}"
    if loss_type == "exo_pair" and label_smoothing == 0:
        return (
            f"{flag}loss_type exo_pair needs {flag}label_smoothing > 0 (log of the smoothed label); the EXO paper "
            "uses 1e-3"
        )
    return None


def loss_types_problem(
    loss_types: Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    f_divergence_type: str = "reverse_kl",
    use_weighting: bool = False,
    flag: str = "",
) -> str | None:
    """What is wrong with a list of DPO loss types and the knobs that depend on it, or None; `flag` prefixes the
    settings' names (`--model.`). The refusals are TRL 1.16's (weights one per type, f-divergences only for the
    loss types in `F_DIVERGENCE_LOSSES`, no WPO weights on sorting losses), plus: no type twice (each is logged as
    `loss/<type>`)."""
    unknown = [loss_type for loss_type in loss_types if loss_type not in DPO_LOSSES]
    if unknown or not loss_types:
        return f"{flag}loss_type {unknown or '[]'}: choose one or more of {sorted(DPO_LOSSES)}"
    if len(set(loss_types)) < len(loss_types):
        return f"{flag}loss_type {list(loss_types)} names a loss type twice; give it one weight instead"
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        return (f"{flag}loss_weights has {len(loss_weights)} weights for {len(loss_types)} loss types "
                f"{list(loss_types)}: give one per type")  # fmt: skip
    if f_divergence_type not in F_DIVERGENCES:
        return f"{flag}f_divergence_type {f_divergence_type!r}: choose one of {list(F_DIVERGENCES)}"
    if f_divergence_type != "reverse_kl" and (others := sorted(set(loss_types) - F_DIVERGENCE_LOSSES)):
        return (f"{flag}f_divergence_type {f_divergence_type} is not defined for loss_type {', '.join(others)} (only "
                f"for {', '.join(sorted(F_DIVERGENCE_LOSSES))}); use reverse_kl with it")  # fmt: skip
    if use_weighting and (sorting := sorted(set(loss_types) & SORTING_LOSSES)):
        return f"{flag}use_weighting (WPO) is not defined for loss_type {', '.join(sorting)}, which sorts the pairs"
    return None


def dpo_loss_terms(
    logps: PairLogps,
    loss_types: Sequence[str],
    knobs: LossKnobs,
    *,
    loss_weights: Sequence[float] | None = None,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Several DPO loss types at once, as MPO (Wang et al. 2024, arXiv:2411.10442, eq. 1) and TRL 1.16 combine
    them: sum_k w_k * L_k, each L_k from `DPO_LOSSES`, w_k from `loss_weights` (1 each when None). With
    `pair_weights` (B,) each L_k is first scaled pair by pair (WPO, `wpo_pair_weights`).

    Returns (losses, terms): the weighted sum (B,) and each type's L_k (B,), unweighted by w_k."""
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    terms = {}
    for loss_type in loss_types:
        term = DPO_LOSSES[loss_type](logps, knobs)
        terms[loss_type] = term if pair_weights is None else term * pair_weights
    losses = sum(weight * term for weight, term in zip(weights, terms.values(), strict=True))
    return losses, terms


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType | Sequence[DPOLossType] = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    reward_shift: float | Tensor = 0.0,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: FDivergenceType = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO family (Rafailov et al. 2023, eq. 7) on log pi/ref of the chosen and the rejected answers.

    `loss_type` picks the loss from `DPO_LOSSES`, or a list of them summed with `loss_weights` (`dpo_loss_terms`).
    The loss types in `MEAN_LOGPS_LOSSES` take per-token means, or sums with `chosen_tokens` / `rejected_tokens`
    (answer lengths (B,), which sigmoid_norm and sft read too); the others take sums. `discopop_tau` is DiscoPOP's
    temperature, `reward_shift` bco_pair's delta, `f_divergence_type` / `f_alpha_divergence_coef` f-DPO's
    divergence (`f_divergence_score`), `pair_weights` (B,) WPO's weights (`wpo_pair_weights`).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards = beta * (policy - reference),
    the implicit reward of eq. 5 without its partition term.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    problem = loss_types_problem(loss_types, loss_weights, f_divergence_type=f_divergence_type,
                                 use_weighting=pair_weights is not None)  # fmt: skip
    for each in loss_types:
        problem = problem or label_smoothing_problem(label_smoothing, each)
    if problem:
        raise ValueError(problem)
    logps = PairLogps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_tokens, rejected_tokens)  # fmt: skip
    knobs = LossKnobs(beta, label_smoothing, discopop_tau, reward_shift, f_divergence_type, f_alpha_divergence_coef)
    losses, _ = dpo_loss_terms(logps, loss_types, knobs, loss_weights=loss_weights, pair_weights=pair_weights)
    return losses, beta * logps.chosen_logratios.detach(), beta * logps.rejected_logratios.detach()


class RunningMean:
    """The mean of every reward seen so far: bco_pair's reward shift delta (Jung et al. 2024, sec. 3).

    State for exact resume: `state_dict()` / `load_state_dict()` (plain floats and ints). Under DDP pass `gather`,
    a function that returns the values of every process (e.g. LightningModule.all_gather): each process then holds
    the same mean.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, values: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> float:
        """Add `values` (any shape) to the mean; returns the new mean."""
        values = values.detach()
        if gather is not None:
            values = gather(values)
        values = values.double().flatten()
        count = self.count + values.numel()
        if count > self.count:  # incremental mean: exact in float64 for the counts of a training run
            self.mean += (values.sum().item() - values.numel() * self.mean) / count
            self.count = count
        return self.mean

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


def chosen_nll(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """The token-mean NLL of the batch's chosen answers, -sum_i logp_i / sum_i n_i (summed logps, token counts),
    spread over the pairs as -logp_i * B / sum_j n_j so that its mean over the batch is that NLL: the `nll_loss`
    of TRL's CPO trainer (cross entropy over every chosen token of the batch). Returns (B,)."""
    return -chosen_logps * chosen_logps.numel() / chosen_tokens.sum().clamp(min=1)


def rpo_loss(losses: Tensor, nll: Tensor, rpo_alpha: float) -> Tensor:
    """RPO, Pang et al. 2024 (Iterative Reasoning Preference Optimization, arXiv:2404.19733), sec. 2: a preference
    loss plus rpo_alpha times the NLL of the chosen answer (`chosen_nll`); with any loss type. (B,) -> (B,)."""
    return losses + rpo_alpha * nll


def simpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), eq. 6: -log s(beta * (mean logp_w - mean logp_l) - gamma),
    reference-free, on per-token MEAN logps, gamma the target reward margin; conservative label smoothing as TRL's
    CPO trainer (loss_type="simpo", which writes it as beta * (h - gamma / beta)).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards = beta * mean logps, detached.
    """
    losses = _smoothed_sigmoid(beta * (chosen_logps - rejected_logps) - gamma, label_smoothing)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def cpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The preference term of CPO, Xu et al. 2024 (arXiv:2401.08417), eq. 3: -log s(beta * (logp_w - logp_l)) on
    summed logps, reference-free (DPO with a uniform reference); CPO adds the chosen NLL (`chosen_nll`, weighted
    by cpo_alpha). Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards = beta * logps, detached.
    """
    losses = _smoothed_sigmoid(beta * (chosen_logps - rejected_logps), label_smoothing)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


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
