"""Preference losses against values worked out by hand."""

import math

import mpmath
import pytest
import torch

from alignment.losses import dpo_loss, log1mexp, orpo_loss

LN2 = 0.6931471805599453
# ln(1 + e^-1) = -log sigmoid(1)
SOFTPLUS_NEG1 = 0.31326168751822286


def t(*values: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def margin_inputs() -> tuple[torch.Tensor, ...]:
    """policy chosen -1, rejected -3, references -2 / -2: h = (-1 + 2) - (-3 + 2) = 2."""
    return t(-1.0), t(-3.0), t(-2.0), t(-2.0)


# --- DPO: sigmoid ---------------------------------------------------------------------------------------------------


def test_sigmoid_zero_margin_is_ln2_with_zero_rewards():
    losses, chosen_rewards, rejected_rewards = dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), beta=0.1)
    assert losses.item() == pytest.approx(LN2, abs=1e-12)
    assert chosen_rewards.item() == 0.0
    assert rejected_rewards.item() == 0.0


def test_sigmoid_at_beta_margin_one():
    # h = 2, beta = 0.5 -> beta * h = 1 -> loss = ln(1 + e^-1)
    losses, _, _ = dpo_loss(*margin_inputs(), beta=0.5)
    assert losses.item() == pytest.approx(SOFTPLUS_NEG1, abs=1e-12)


def test_rewards_are_beta_times_policy_minus_reference():
    # chosen: 0.5 * (-1 - -2) = 0.5; rejected: 0.5 * (-3 - -2) = -0.5
    _, chosen_rewards, rejected_rewards = dpo_loss(*margin_inputs(), beta=0.5)
    assert chosen_rewards.item() == pytest.approx(0.5, abs=1e-12)
    assert rejected_rewards.item() == pytest.approx(-0.5, abs=1e-12)


def test_label_smoothing_at_zero_margin_is_still_ln2():
    losses, _, _ = dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), beta=0.1, label_smoothing=0.3)
    assert losses.item() == pytest.approx(LN2, abs=1e-12)


def test_label_smoothing_at_beta_margin_one():
    # 0.8 * ln(1 + e^-1) + 0.2 * ln(1 + e); ln(1 + e) = 1 + ln(1 + e^-1)
    # = ln(1 + e^-1) + 0.2 = 0.31326168751822286 + 0.2
    losses, _, _ = dpo_loss(*margin_inputs(), beta=0.5, label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.5132616875182229, abs=1e-12)


def test_sigmoid_gradient_wrt_policy_chosen():
    # d/d(pc) of -log sigmoid(beta * h) = -beta * sigmoid(-beta * h); beta = 0.5, beta * h = 1:
    # -0.5 / (1 + e) = -0.13447071068499755
    policy_chosen = t(-1.0, requires_grad=True)
    losses, _, _ = dpo_loss(policy_chosen, t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    losses.sum().backward()
    assert policy_chosen.grad.item() == pytest.approx(-0.13447071068499755, abs=1e-12)


# --- DPO: hinge, ipo, robust ----------------------------------------------------------------------------------------


def test_hinge_inside_margin():
    # h = 2, beta = 0.2 -> beta * h = 0.4 -> max(0, 1 - 0.4) = 0.6
    losses, _, _ = dpo_loss(*margin_inputs(), beta=0.2, loss_type="hinge")
    assert losses.item() == pytest.approx(0.6, abs=1e-12)


def test_hinge_beyond_margin_is_zero():
    # h = 2, beta = 1 -> beta * h = 2 > 1 -> 0
    losses, _, _ = dpo_loss(*margin_inputs(), beta=1.0, loss_type="hinge")
    assert losses.item() == 0.0


def test_ipo():
    # h = (0 - -2) - (-1 - 0) = 3, beta = 0.25 -> (3 - 1 / 0.5)^2 = (3 - 2)^2 = 1
    losses, _, _ = dpo_loss(t(0.0), t(-1.0), t(-2.0), t(0.0), beta=0.25, loss_type="ipo")
    assert losses.item() == pytest.approx(1.0, abs=1e-12)


def test_ipo_zero_at_target_margin():
    # h = 2 = 1 / (2 * 0.25)
    losses, _, _ = dpo_loss(*margin_inputs(), beta=0.25, loss_type="ipo")
    assert losses.item() == pytest.approx(0.0, abs=1e-12)


def test_robust_without_smoothing_equals_sigmoid():
    robust, _, _ = dpo_loss(*margin_inputs(), beta=0.5, loss_type="robust")
    assert robust.item() == pytest.approx(SOFTPLUS_NEG1, abs=1e-12)


def test_robust_zero_margin_is_ln2():
    # (0.9 * ln 2 + 0.1 * (-ln 2)) / 0.8 = 0.8 * ln 2 / 0.8 = ln 2
    losses, _, _ = dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), beta=0.1, loss_type="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx(LN2, abs=1e-12)


def test_robust_at_beta_margin_one():
    # (0.9 * ln(1 + e^-1) + 0.1 * log sigmoid(-1)) / 0.8, log sigmoid(-1) = -(1 + ln(1 + e^-1))
    # = (0.8 * ln(1 + e^-1) - 0.1) / 0.8 = ln(1 + e^-1) - 0.125 = 0.31326168751822286 - 0.125
    losses, _, _ = dpo_loss(*margin_inputs(), beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.1882616875182229, abs=1e-12)


# --- DPO: shapes, detaching, validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_shapes_and_detached_rewards(loss_type):
    torch.manual_seed(0)
    policy_chosen = (-5 * torch.rand(3)).requires_grad_()
    policy_rejected = (-5 * torch.rand(3)).requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, -5 * torch.rand(3), -5 * torch.rand(3), loss_type=loss_type
    )
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (3,)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad
    assert not rejected_rewards.requires_grad


def test_dpo_batch_is_elementwise():
    # rows: h = 0, h = 2, h = 2 with beta = 0.5 -> ln 2, ln(1 + e^-1), ln(1 + e^-1)
    losses, _, _ = dpo_loss(t(-1.0, -1.0, 0.0), t(-1.0, -3.0, -2.0), t(-1.0, -2.0, -1.0), t(-1.0, -2.0, -1.0), beta=0.5)
    torch.testing.assert_close(losses, t(LN2, SOFTPLUS_NEG1, SOFTPLUS_NEG1), rtol=0, atol=1e-12)


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="kto"):
        dpo_loss(*margin_inputs(), loss_type="kto")


@pytest.mark.parametrize("label_smoothing", [0.5, 0.7, -0.1])
def test_invalid_label_smoothing_raises(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*margin_inputs(), label_smoothing=label_smoothing)


# --- ORPO -----------------------------------------------------------------------------------------------------------


def orpo_half_quarter(beta: float = 0.1) -> tuple[torch.Tensor, ...]:
    """chosen p = 0.5 (odds 1), rejected p = 0.25 (odds 1/3)."""
    return orpo_loss(t(math.log(0.5)), t(math.log(0.25)), beta=beta)


def test_orpo_log_odds_chosen():
    # ln(1) - ln(1/3) = ln 3
    *_, log_odds_chosen = orpo_half_quarter()
    assert log_odds_chosen.item() == pytest.approx(1.0986122886681098, abs=1e-9)


def test_orpo_log_odds_ratio():
    # log sigmoid(ln 3) = ln(3 / (3 + 1)) = ln(3/4)
    _, _, _, log_odds_ratio, _ = orpo_half_quarter()
    assert log_odds_ratio.item() == pytest.approx(-0.2876820724517809, abs=1e-9)


def test_orpo_loss_value():
    # -0.2 * ln(3/4) = 0.2 * 0.2876820724517809
    or_losses, *_ = orpo_half_quarter(beta=0.2)
    assert or_losses.item() == pytest.approx(0.05753641449035618, abs=1e-9)


def test_orpo_rewards_are_beta_times_logps():
    # 0.2 * ln 0.5, 0.2 * ln 0.25
    _, chosen_rewards, rejected_rewards, _, _ = orpo_half_quarter(beta=0.2)
    assert chosen_rewards.item() == pytest.approx(-0.13862943611198905, abs=1e-12)
    assert rejected_rewards.item() == pytest.approx(-0.2772588722239781, abs=1e-12)


def test_orpo_losses_nonnegative_on_random_inputs():
    torch.manual_seed(0)
    chosen = -10 * torch.rand(256) - 1e-4
    rejected = -10 * torch.rand(256) - 1e-4
    or_losses, *_ = orpo_loss(chosen, rejected, beta=0.1)
    assert torch.isfinite(or_losses).all()
    assert (or_losses >= 0).all()


def test_orpo_shapes_and_detached_outputs():
    torch.manual_seed(0)
    chosen = (-3 * torch.rand(3) - 0.1).requires_grad_()
    rejected = (-3 * torch.rand(3) - 0.1).requires_grad_()
    or_losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_loss(chosen, rejected)
    for out in (or_losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen):
        assert out.shape == (3,)
    assert or_losses.requires_grad
    assert not chosen_rewards.requires_grad
    assert not rejected_rewards.requires_grad


# --- ORPO's log(1 - p) as mean logp -> 0, against 50-digit references --------------------------------------------

mpmath.mp.dps = 50
NEAR_ZERO = [-1e-2, -1e-4, -1e-6, -1e-8, -1e-10]
MODERATE = [-0.5, -0.6931, -0.6932, -1.0, -5.0, -30.0]
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-13}  # relative: a few units in the last place


def exact(x: torch.Tensor) -> mpmath.mpf:
    return mpmath.mpf(x.item())  # the value the tensor holds, not the decimal it was written from


def exact_log1mexp(x: mpmath.mpf) -> tuple[mpmath.mpf, mpmath.mpf]:
    """log(1 - e^x) and its derivative -e^x / (1 - e^x)."""
    return mpmath.log(1 - mpmath.exp(x)), -mpmath.exp(x) / (1 - mpmath.exp(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", NEAR_ZERO + MODERATE)
def test_log1mexp_value_and_gradient(value, dtype):
    x = torch.tensor(value, dtype=dtype, requires_grad=True)
    out = log1mexp(x)
    out.backward()
    expected, expected_grad = exact_log1mexp(exact(x))
    assert out.dtype == dtype
    assert out.item() == pytest.approx(float(expected), rel=TOLERANCE[dtype], abs=0)
    assert x.grad.item() == pytest.approx(float(expected_grad), rel=TOLERANCE[dtype], abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chosen", NEAR_ZERO + MODERATE)
def test_orpo_log_odds_and_gradients_near_zero(chosen, dtype):
    """log odds(c) - log odds(r) and d or_loss / d(c, r) against exact values, the rejected answer at mean logp -1.

    d/dc [-beta log sigmoid(z)] = -beta sigmoid(-z) / (1 - e^c); d/dr = +beta sigmoid(-z) / (1 - e^r)."""
    beta = 0.1
    c = torch.tensor([chosen], dtype=dtype, requires_grad=True)
    r = torch.tensor([-1.0], dtype=dtype, requires_grad=True)
    or_losses, _, _, _, log_odds_chosen = orpo_loss(c, r, beta=beta)
    or_losses.sum().backward()
    ec, er = exact(c), exact(r)
    z = (ec - mpmath.log(1 - mpmath.exp(ec))) - (er - mpmath.log(1 - mpmath.exp(er)))
    sig = 1 / (1 + mpmath.exp(z))  # sigmoid(-z)
    rel = TOLERANCE[dtype]
    assert log_odds_chosen.item() == pytest.approx(float(z), rel=rel, abs=0)
    assert or_losses.item() == pytest.approx(float(-beta * mpmath.log(1 - sig)), rel=10 * rel, abs=0)
    assert c.grad.item() == pytest.approx(float(-beta * sig / (1 - mpmath.exp(ec))), rel=10 * rel, abs=0)
    assert r.grad.item() == pytest.approx(float(beta * sig / (1 - mpmath.exp(er))), rel=10 * rel, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_at_zero_is_finite_with_zero_gradient(dtype):
    """x = 0 (a mean logp that rounds to 0), and subnormal x, read as x = -tiny: value log(tiny), no gradient."""
    x = torch.tensor([0.0, -0.0, -1e-310 if dtype == torch.float64 else -1e-40], dtype=dtype, requires_grad=True)
    out = log1mexp(x)
    out.sum().backward()
    torch.testing.assert_close(out, torch.full_like(out, math.log(torch.finfo(dtype).tiny)), rtol=1e-6, atol=0)
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_gradient_from_the_branch_not_taken(dtype):
    """Both branches are evaluated for every element; each on an input it can take, so no inf * 0 = NaN."""
    x = torch.tensor([0.0, -1e-30, -1e-8, -math.log(2), -0.7, -100.0, -1e4, -math.inf], dtype=dtype)
    x.requires_grad_()
    out = log1mexp(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    assert out[-1].item() == 0.0 and x.grad[-1].item() == 0.0  # p = 0: log 1, flat


def test_orpo_at_mean_logp_zero_is_finite_and_pushes_the_rejected_answer_down():
    """rejected mean logp 0 (p rounds to 1): log odds(rejected) = 0 - log(tiny) = 87.34 in float32; or_loss =
    -beta log sigmoid(z) ~ beta * 87.88 and d or_loss / dr = beta * sigmoid(-z) * 1 ~ beta (the log p term only)."""
    beta = 0.1
    c = torch.tensor([-1.0], requires_grad=True)
    r = torch.tensor([0.0], requires_grad=True)
    or_losses, *_, log_odds_chosen = orpo_loss(c, r, beta=beta)
    or_losses.sum().backward()
    log_odds_c = -1.0 - math.log(1 - math.exp(-1.0))  # -0.5413
    z = log_odds_c - (0.0 - math.log(torch.finfo(torch.float32).tiny))
    assert log_odds_chosen.item() == pytest.approx(z, rel=1e-6)
    assert or_losses.item() == pytest.approx(-beta * (z - math.log1p(math.exp(z))), rel=1e-6)
    assert r.grad.item() == pytest.approx(beta, rel=1e-6)
    assert torch.isfinite(c.grad).all() and c.grad.item() < 0
