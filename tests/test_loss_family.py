"""The DPO loss family beyond sigmoid/hinge/ipo/robust, RPO's NLL term, SimPO and CPO.

Each loss twice: against numbers worked out by hand (written out below from the formulas), and against TRL 1.16's
own code (`DPOTrainer._compute_loss` and `CPOTrainer.cpo_loss`, called on trainer objects built without their
`__init__`, with a stand-in model that returns chosen per-token log-probs we choose).
"""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignment.losses import (
    DPO_LOSSES,
    MEAN_LOGPS_LOSSES,
    RunningMean,
    chosen_nll,
    cpo_loss,
    dpo_loss,
    rpo_loss,
    simpo_loss,
)


def t(*values: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def one_pair() -> tuple[torch.Tensor, ...]:
    """policy chosen -1, rejected -3, references -2 / -2: log-ratios +1 (chosen), -1 (rejected), margin h = 2."""
    return t(-1.0), t(-3.0), t(-2.0), t(-2.0)


# --- by hand -------------------------------------------------------------------------------------------------------


def test_bco_pair_without_shift():
    # beta 0.5: r_w = 0.5, r_l = -0.5; -log s(0.5) - log s(0.5) = 2 ln(1 + e^-0.5)
    losses, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="bco_pair")
    assert losses.item() == pytest.approx(2 * softplus(-0.5), abs=1e-12)
    assert losses.item() == pytest.approx(0.9481539683602133, abs=1e-12)


def test_bco_pair_with_reward_shift():
    # delta 0.5: -log s(0.5 - 0.5) - log s(-(-0.5 - 0.5)) = ln 2 + ln(1 + e^-1)
    losses, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="bco_pair", reward_shift=0.5)
    assert losses.item() == pytest.approx(0.6931471805599453 + 0.31326168751822286, abs=1e-12)


def test_sppo_hard_regresses_log_ratios_onto_half_over_beta():
    # beta 0.25: targets +2 and -2; (1 - 2)^2 + (-1 + 2)^2 = 2
    losses, _, _ = dpo_loss(*one_pair(), beta=0.25, loss_type="sppo_hard")
    assert losses.item() == pytest.approx(2.0, abs=1e-12)
    # at beta 0.5 the targets are +1 / -1: exactly the log-ratios, loss 0
    losses, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="sppo_hard")
    assert losses.item() == pytest.approx(0.0, abs=1e-12)


def test_nca_pair():
    # r_w = 0.5, r_l = -0.5: -log s(0.5) - 1/2 log s(-0.5) - 1/2 log s(0.5)
    # = 1.5 ln(1 + e^-0.5) + 0.5 ln(1 + e^0.5) = 1.5 * 0.474077 + 0.5 * 0.974077
    losses, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="nca_pair")
    assert losses.item() == pytest.approx(1.5 * softplus(-0.5) + 0.5 * softplus(0.5), abs=1e-12)
    assert losses.item() == pytest.approx(1.1981539683602134, abs=1e-12)


def test_apo_zero_and_apo_down():
    # apo_zero: (1 - s(0.5)) + s(-0.5) = 2 s(-0.5); apo_down: s(0.5) + 1 - s(beta h = 1)
    zero, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="apo_zero")
    down, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="apo_down")
    assert zero.item() == pytest.approx(2 * sigmoid(-0.5), abs=1e-12)
    assert zero.item() == pytest.approx(0.7550813375962908, abs=1e-12)  # 2 / (1 + 1.6487213)
    assert down.item() == pytest.approx(sigmoid(0.5) + 1 - sigmoid(1.0), abs=1e-12)


def test_apo_zero_pushes_chosen_up_and_rejected_down_apo_down_pushes_both_down():
    logps = [x.clone().requires_grad_(True) for x in one_pair()]
    dpo_loss(*logps, beta=0.5, loss_type="apo_zero")[0].sum().backward()
    assert logps[0].grad.item() < 0 < logps[1].grad.item()  # descent raises chosen, lowers rejected
    logps = [x.clone().requires_grad_(True) for x in one_pair()]
    dpo_loss(*logps, beta=0.5, loss_type="apo_down")[0].sum().backward()
    # d/d chosen: beta s'(0.5) - beta s'(1) > 0 (s' falls away from 0): descent lowers chosen; rejected: + beta s'(1)
    assert logps[0].grad.item() == pytest.approx(0.5 * (sigmoid(0.5) * sigmoid(-0.5) - sigmoid(1) * sigmoid(-1)))
    assert logps[0].grad.item() > 0 and logps[1].grad.item() > 0


def test_aot_matches_sorted_policy_margins_to_sorted_reference_margins():
    # policy margins (chosen - rejected) 3 and -1, reference margins 0 and 2; sorted: (-1, 3) against (0, 2),
    # deltas -1 and +1, beta 1: losses ln(1 + e) and ln(1 + e^-1), in quantile order (pair-wise: 3 - 0, -1 - 2)
    losses, _, _ = dpo_loss(t(0.0, -1.0), t(-3.0, 0.0), t(-1.0, -1.0), t(-1.0, -3.0), beta=1.0, loss_type="aot")
    assert losses.tolist() == pytest.approx([1.3132616875182228, 0.31326168751822286], abs=1e-12)
    smoothed, _, _ = dpo_loss(
        t(0.0, -1.0), t(-3.0, 0.0), t(-1.0, -1.0), t(-1.0, -3.0), beta=1.0, loss_type="aot", label_smoothing=0.1
    )
    # 0.9 ln(1 + e^-d) + 0.1 ln(1 + e^d), d = -1 and +1
    assert smoothed.tolist() == pytest.approx(
        [0.9 * softplus(1) + 0.1 * softplus(-1), 0.9 * softplus(-1) + 0.1 * softplus(1)], abs=1e-12
    )


def test_exo_pair_is_a_kl_to_the_smoothed_labels():
    # beta h = 1, eps 0.1: s(1) (log s(1) - ln 0.9) + s(-1) (log s(-1) - ln 0.1)
    losses, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="exo_pair", label_smoothing=0.1)
    q = sigmoid(1.0)
    assert losses.item() == pytest.approx(q * math.log(q / 0.9) + (1 - q) * math.log((1 - q) / 0.1), abs=1e-12)
    # the KL is 0 where the policy's probability of the chosen answer equals 1 - eps: beta h = ln(0.9 / 0.1)
    at_label, _, _ = dpo_loss(
        t(math.log(9)), t(0.0), t(0.0), t(0.0), beta=1.0, loss_type="exo_pair", label_smoothing=0.1
    )
    assert at_label.item() == pytest.approx(0.0, abs=1e-12)


def test_exo_pair_needs_label_smoothing():
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        dpo_loss(*one_pair(), beta=0.5, loss_type="exo_pair")


def test_discopop_blends_logistic_and_exponential():
    # beta h = 0: weight s(0) = 1/2: 1/2 ln 2 + 1/2 e^0
    at_zero, _, _ = dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), beta=0.5, loss_type="discopop")
    assert at_zero.item() == pytest.approx(0.5 * 0.6931471805599453 + 0.5, abs=1e-12)
    # beta h = 1, tau 0.05: weight s(20); (1 - w) ln(1 + e^-1) + w e^-1
    losses, _, _ = dpo_loss(*one_pair(), beta=0.5, loss_type="discopop", discopop_tau=0.05)
    w = sigmoid(20.0)
    assert losses.item() == pytest.approx((1 - w) * 0.31326168751822286 + w * math.exp(-1), abs=1e-12)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_every_loss_type_rewards_are_beta_log_ratios(loss_type):
    smoothing = 0.1 if loss_type == "exo_pair" else 0.0
    _, chosen_rewards, rejected_rewards = dpo_loss(
        *one_pair(), beta=0.5, loss_type=loss_type, label_smoothing=smoothing
    )
    assert (chosen_rewards.item(), rejected_rewards.item()) == (0.5, -0.5)
    assert not chosen_rewards.requires_grad


def test_only_ipo_takes_mean_logps():
    assert MEAN_LOGPS_LOSSES == {"ipo"}


# --- bco_pair's running mean ---------------------------------------------------------------------------------------


def test_running_mean_of_every_value_seen():
    running = RunningMean()
    assert running.update(t(1.0, 3.0)) == 2.0
    assert running.update(t(8.0)) == 4.0  # (1 + 3 + 8) / 3
    assert running.count == 3


def test_running_mean_state_round_trip_continues_identically():
    running = RunningMean()
    running.update(t(0.1, 0.7, -0.3))
    resumed = RunningMean()
    resumed.load_state_dict(running.state_dict())
    assert resumed.update(t(0.25)) == running.update(t(0.25))
    assert running.state_dict() == {"mean": pytest.approx(0.1875, abs=1e-15), "count": 4}


def test_running_mean_gathers_before_updating():
    # as under DDP: the other process's values arrive through `gather`, every process holds their common mean
    running = RunningMean()
    running.update(t(1.0), gather=lambda values: torch.stack([values, values + 2]))
    assert (running.mean, running.count) == (2.0, 2)


# --- RPO, SimPO, CPO -----------------------------------------------------------------------------------------------


def test_chosen_nll_is_the_batch_token_mean():
    # chosen sums -2 (2 tokens) and -6 (4 tokens): token mean 8 / 6; per pair -logp * B / 6 = 2/3 and 2
    nll = chosen_nll(t(-2.0, -6.0), torch.tensor([2, 4]))
    assert nll.tolist() == pytest.approx([2 / 3, 2.0], abs=1e-12)
    assert nll.mean().item() == pytest.approx(4 / 3, abs=1e-12)


def test_rpo_adds_alpha_times_the_nll():
    losses = rpo_loss(t(0.5, 0.25), chosen_nll(t(-2.0, -6.0), torch.tensor([2, 4])), rpo_alpha=0.5)
    assert losses.tolist() == pytest.approx([0.5 + 1 / 3, 0.25 + 1.0], abs=1e-12)


def test_simpo_by_hand():
    # mean logps -1 and -2, beta 2, gamma 0.5: -log s(2 * 1 - 0.5) = ln(1 + e^-1.5); rewards 2 * mean logps
    losses, chosen_rewards, rejected_rewards = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-1.5), abs=1e-12)
    assert losses.item() == pytest.approx(0.20141327798275246, abs=1e-12)
    assert (chosen_rewards.item(), rejected_rewards.item()) == (-2.0, -4.0)
    smoothed, _, _ = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-1.5) + 0.1 * softplus(1.5), abs=1e-12)


def test_simpo_at_the_target_margin_is_ln2():
    # beta (h) = gamma: the logit is 0
    losses, _, _ = simpo_loss(t(-1.0), t(-1.25), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(0.6931471805599453, abs=1e-12)


def test_cpo_by_hand():
    # sums -4 and -6, beta 0.5: -log s(1) = ln(1 + e^-1); rewards beta * logps
    losses, chosen_rewards, rejected_rewards = cpo_loss(t(-4.0), t(-6.0), beta=0.5)
    assert losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert (chosen_rewards.item(), rejected_rewards.item()) == (-2.0, -3.0)


# --- against TRL 1.16 ------------------------------------------------------------------------------------------------

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the CPO trainer lives in trl.experimental
from trl.experimental.cpo import cpo_trainer as trl_cpo  # noqa: E402  (TRL 1.16: the oracle, in the dev extra)
from trl.trainer import dpo_trainer as trl_dpo  # noqa: E402

# three pairs; answer lengths chosen 2, 3, 1 and rejected 4, 2, 3 tokens (the per-token means differ from sums)
POLICY_CHOSEN = t(-3.0, -4.5, -0.7)
POLICY_REJECTED = t(-6.0, -3.9, -5.1)
REF_CHOSEN = t(-3.4, -4.0, -1.5)
REF_REJECTED = t(-5.0, -4.2, -4.4)
CHOSEN_TOKENS = torch.tensor([2, 3, 1])
REJECTED_TOKENS = torch.tensor([4, 2, 3])


class StandInModel:
    """Returns per-token log-probs that sum, per sequence, to the policy logps above (TRL's fused-LM-head output)."""

    training = True

    def __call__(self, input_ids, labels, **kwargs):
        mask = labels[:, 1:] != -100  # (2B, T-1) completion positions, as TRL shifts them
        sums, counts = torch.cat([POLICY_CHOSEN, POLICY_REJECTED]), mask.sum(1)
        log_probs = mask * (sums / counts)[:, None]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo_loss(loss_types, *, beta, label_smoothing=0.0, loss_weights=None, discopop_tau=0.05):
    """TRL 1.16's DPOTrainer._compute_loss on the pairs above (reference log-probs as precomputed): (loss, metrics)."""
    trainer = object.__new__(trl_dpo.DPOTrainer)
    trainer.__dict__.update(
        beta=beta, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=None,
        f_divergence_type="reverse_kl", label_smoothing=label_smoothing, use_weighting=False,
        precompute_ref_logps=True, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, model=StandInModel(),
        args=SimpleNamespace(discopop_tau=discopop_tau),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
    )  # fmt: skip
    lengths = torch.cat([CHOSEN_TOKENS, REJECTED_TOKENS])
    width = 1 + int(lengths.max())  # one prompt token, then the answer
    completion_mask = (torch.arange(width)[None, :] >= 1) & (torch.arange(width)[None, :] <= lengths[:, None])
    inputs = {
        "input_ids": torch.zeros(6, width, dtype=torch.long),
        "attention_mask": torch.ones(6, width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": REF_CHOSEN,
        "ref_rejected_logps": REF_REJECTED,
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}


def ours(loss_type, *, beta, label_smoothing=0.0, discopop_tau=0.05):
    logps = POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED
    if loss_type in MEAN_LOGPS_LOSSES:
        logps = tuple(x / n for x, n in zip(logps, [CHOSEN_TOKENS, REJECTED_TOKENS] * 2, strict=True))
    return dpo_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, discopop_tau=discopop_tau)


TRL_CASES = [  # (loss_type, beta, label_smoothing); TRL 1.16's sigmoid has no label smoothing
    ("sigmoid", 0.1, 0.0), ("hinge", 0.3, 0.0), ("ipo", 0.5, 0.0), ("robust", 0.1, 0.2), ("bco_pair", 0.5, 0.0),
    ("sppo_hard", 0.5, 0.0), ("nca_pair", 0.5, 0.0), ("apo_zero", 0.5, 0.0), ("apo_down", 0.5, 0.0),
    ("aot", 0.5, 0.0), ("aot", 0.5, 0.2), ("exo_pair", 0.5, 1e-3), ("discopop", 0.5, 0.0),
]  # fmt: skip


def test_every_loss_type_is_checked_against_trl():
    assert {case[0] for case in TRL_CASES} == set(DPO_LOSSES)


@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing"), TRL_CASES)
def test_dpo_loss_types_match_trl(loss_type, beta, label_smoothing):
    trl_value, _ = trl_dpo_loss([loss_type], beta=beta, label_smoothing=label_smoothing)
    losses, _, _ = ours(loss_type, beta=beta, label_smoothing=label_smoothing)
    assert losses.mean().item() == pytest.approx(trl_value, rel=1e-6, abs=1e-7)


def test_discopop_temperature_matches_trl():
    trl_value, _ = trl_dpo_loss(["discopop"], beta=1.0, discopop_tau=0.5)
    losses, _, _ = ours("discopop", beta=1.0, discopop_tau=0.5)
    assert losses.mean().item() == pytest.approx(trl_value, rel=1e-6)


@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - MEAN_LOGPS_LOSSES))
def test_rewards_match_what_trl_logs(loss_type):
    # TRL logs beta * summed log-ratios for every loss type; so do ours on sums
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    _, metrics = trl_dpo_loss([loss_type], beta=0.5, label_smoothing=smoothing)
    _, chosen_rewards, rejected_rewards = ours(loss_type, beta=0.5, label_smoothing=smoothing)
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-6)
    assert (chosen_rewards > rejected_rewards).double().mean().item() == pytest.approx(metrics["rewards/accuracies"])
    assert (chosen_rewards - rejected_rewards).mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_rpo_matches_trl_with_an_sft_term(loss_type):
    # TRL 1.16 writes RPO as loss_type=[X, "sft"], loss_weights=[1, rpo_alpha]: its "sft" is the batch token-mean NLL
    trl_value, _ = trl_dpo_loss([loss_type, "sft"], beta=0.5, loss_weights=[1.0, 0.7])
    losses, _, _ = ours(loss_type, beta=0.5)
    total = rpo_loss(losses, chosen_nll(POLICY_CHOSEN, CHOSEN_TOKENS), rpo_alpha=0.7)
    assert total.mean().item() == pytest.approx(trl_value, rel=1e-6)


def trl_cpo_loss(chosen, rejected, **attributes):
    trainer = object.__new__(trl_cpo.CPOTrainer)
    trainer.__dict__.update(alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")), **attributes)
    return trainer.cpo_loss(chosen, rejected)


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.15)])
def test_simpo_matches_trl(beta, gamma, label_smoothing):
    chosen, rejected = POLICY_CHOSEN / CHOSEN_TOKENS, POLICY_REJECTED / REJECTED_TOKENS  # SimPO's mean logps
    expected = trl_cpo_loss(
        chosen, rejected, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=label_smoothing
    )
    got = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    for ours_value, trl_value in zip(got, expected, strict=True):
        torch.testing.assert_close(ours_value, trl_value)


@pytest.mark.parametrize(("beta", "label_smoothing"), [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_cpo_matches_trl(beta, label_smoothing):
    expected = trl_cpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing
    )
    got = cpo_loss(POLICY_CHOSEN, POLICY_REJECTED, beta=beta, label_smoothing=label_smoothing)
    for ours_value, trl_value in zip(got, expected, strict=True):
        torch.testing.assert_close(ours_value, trl_value)


# --- the loss types TRL 1.16 added: aot_unpaired, sft, sigmoid_norm --------------------------------------------------
# sft and sigmoid_norm read the answers' lengths, which `ours` above does not pass: tests/test_trl_options.py compares
# the three with TRL (loss and gradient). A new list object, so that the parametrized comparison above keeps its own
# cases while the check that every loss type is compared sees these too.
TRL_CASES = TRL_CASES + [("aot_unpaired", 0.5, 0.0), ("sft", 0.5, 0.0), ("sigmoid_norm", 0.5, 0.0)]
