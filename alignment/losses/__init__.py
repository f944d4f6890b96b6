"""The losses: pure functions of log-prob tensors (no module state), one registry of DPO's loss types.

`preference`: DPO's loss types, RPO, ORPO, SimPO and CPO, on paired log-probs; `kto`: KTO's, on labelled answers."""

from alignment.losses.preference import (
    DPO_LOSSES,
    MEAN_LOGPS_LOSSES,
    DPOLossType,
    RunningMean,
    chosen_nll,
    cpo_loss,
    dpo_loss,
    label_smoothing_problem,
    log1mexp,
    orpo_loss,
    rpo_loss,
    simpo_loss,
)

__all__ = ["DPO_LOSSES", "MEAN_LOGPS_LOSSES", "DPOLossType", "RunningMean", "chosen_nll", "cpo_loss", "dpo_loss",
           "label_smoothing_problem", "log1mexp", "orpo_loss", "rpo_loss", "simpo_loss"]  # fmt: skip
