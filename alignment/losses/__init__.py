"""The losses: pure functions of log-prob tensors (no module state), one registry of DPO's loss types.

`preference`: DPO's loss types, RPO, ORPO, SimPO and CPO, on paired log-probs; `dpo_variants`: what TRL's DPOConfig
adds around a loss type (f-divergences, LD-DPO, WPO); `kto`: KTO's, on labelled answers."""

from alignment.losses.dpo_variants import (
    F_DIVERGENCES,
    FDivergenceType,
    f_divergence_score,
    ld_token_weights,
    wpo_pair_weights,
)
from alignment.losses.preference import (
    DPO_LOSSES,
    F_DIVERGENCE_LOSSES,
    MEAN_LOGPS_LOSSES,
    SORTING_LOSSES,
    DPOLossType,
    LossKnobs,
    PairLogps,
    RunningMean,
    chosen_nll,
    cpo_loss,
    dpo_loss,
    dpo_loss_terms,
    label_smoothing_problem,
    log1mexp,
    loss_types_problem,
    orpo_loss,
    rpo_loss,
    simpo_loss,
)

__all__ = ["DPO_LOSSES", "F_DIVERGENCES", "F_DIVERGENCE_LOSSES", "MEAN_LOGPS_LOSSES", "SORTING_LOSSES", "DPOLossType",
           "FDivergenceType", "LossKnobs", "PairLogps", "RunningMean", "chosen_nll", "cpo_loss", "dpo_loss",
           "dpo_loss_terms", "f_divergence_score", "label_smoothing_problem", "ld_token_weights", "log1mexp",
           "loss_types_problem", "orpo_loss", "rpo_loss", "simpo_loss", "wpo_pair_weights"]  # fmt: skip
