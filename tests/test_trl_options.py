"""TRL 1.16's DPOConfig and KTOConfig options beyond a single loss type: several loss types with weights (MPO), sft and
sigmoid_norm, aot_unpaired, LD-DPO (ld_alpha), WPO (use_weighting), f-divergences, KTO's apo_zero_unpaired.

Each against TRL's own code (`DPOTrainer._compute_loss`, `KTOTrainer._compute_loss`, called on trainer objects built
without their `__init__`, with stand-in models that return per-token log-probs we choose): the same loss and the same
gradient with respect to the policy's per-token log-probs. Then by hand where a number is easy to write out, the
one-line refusals, and the DPO module's wiring on the tiny model.
"""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignment import DPO, KTO
from alignment.data import TokenizedUnpaired, collate_unpaired
from alignment.errors import ConfigError
from alignment.losses import (
    F_DIVERGENCE_LOSSES,
    LossKnobs,
    PairLogps,
    dpo_loss,
    dpo_loss_terms,
    f_divergence_score,
    ld_token_weights,
    wpo_pair_weights,
)
from alignment.losses.kto import apo_zero_unpaired_loss
from tests.helpers import literal_batch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.trainer import dpo_trainer as trl_dpo  # noqa: E402  (TRL 1.16: the oracle, in the dev extra)
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

# three pairs, answers of chosen 2, 5, 1 and rejected 4, 2, 3 tokens after a 1-token prompt: (2B, T) = (6, 6)
LENGTHS = torch.tensor([2, 5, 1, 4, 2, 3])
WIDTH = 6
COMPLETION_MASK = (torch.arange(WIDTH)[None, :] >= 1) & (torch.arange(WIDTH)[None, :] <= LENGTHS[:, None])
ANSWER_MASK = COMPLETION_MASK[:, 1:]  # (6, 5): position t scores token t + 1


def token_values(seed: int, dtype=torch.float64, low=-2.0, high=0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = low + (high - low) * torch.rand(6, WIDTH - 1, generator=generator, dtype=dtype)
    return values * ANSWER_MASK  # 0 off the answers, as TRL's fused head gives for ignored labels


class StandIn:
    """TRL's model with its fused LM head: returns the per-token log-probs (and log sum p^2) it was given."""

    training = True
    is_gradient_checkpointing = False
    _modules = {}  # accelerate's is_peft_model looks for compiled submodules

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None):
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def __call__(self, input_ids, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs * ANSWER_MASK, log_sum_sq_probs=self.log_sum_sq_probs,
                               entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())  # fmt: skip


def trl_dpo_loss(
    loss_types,
    policy,
    reference,
    log_sum_sq=None,
    *,
    beta=0.5,
    loss_weights=None,
    label_smoothing=0.0,
    ld_alpha=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    use_weighting=False,
):
    """TRL 1.16's DPOTrainer._compute_loss, the reference scored in the step (`ref_model`): the loss tensor."""
    trainer = object.__new__(trl_dpo.DPOTrainer)
    trainer.__dict__.update(
        beta=beta, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing, use_weighting=use_weighting, precompute_ref_logps=False,
        aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, model=StandIn(policy, log_sum_sq),
        ref_model=StandIn(reference), args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
    )  # fmt: skip
    inputs = {"input_ids": torch.zeros(6, WIDTH, dtype=torch.long), "attention_mask": torch.ones(6, WIDTH),
              "completion_mask": COMPLETION_MASK.long()}  # fmt: skip
    return trainer._compute_loss(trainer.model, inputs, return_outputs=False)


def our_dpo_loss(
    loss_types,
    policy,
    reference,
    log_sum_sq=None,
    *,
    beta=0.5,
    loss_weights=None,
    label_smoothing=0.0,
    ld_alpha=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    use_weighting=False,
):
    """Ours on the same per-token log-probs, composed as the DPO module composes them."""
    policy = policy * ANSWER_MASK  # as DPO.token_logps gives them
    weights = (
        ANSWER_MASK.to(policy.dtype) if ld_alpha is None else ld_token_weights(ANSWER_MASK, ld_alpha, policy.dtype)
    )
    policy_sums, reference_sums = (policy * weights).sum(-1), (reference * weights).sum(-1)
    logps = PairLogps(*policy_sums.chunk(2), *reference_sums.chunk(2), *ANSWER_MASK.sum(-1).chunk(2),
                      policy.sum(-1).chunk(2)[0])  # fmt: skip
    knobs = LossKnobs(beta, label_smoothing, 0.05, 0.0, f_divergence_type, f_alpha_divergence_coef)
    pair_weights = wpo_pair_weights(policy, log_sum_sq, ANSWER_MASK) if use_weighting else None
    losses, _ = dpo_loss_terms(logps, loss_types, knobs, loss_weights=loss_weights, pair_weights=pair_weights)
    return losses.mean()


def assert_same_loss_and_gradient(loss_types, *, dtype=torch.float64, **options):
    """TRL's loss and ours, and their gradients with respect to the policy's per-token log-probs, equal."""
    results = []
    for compute in (trl_dpo_loss, our_dpo_loss):
        policy = token_values(0, dtype).requires_grad_(True)
        reference = token_values(1, dtype)
        log_sum_sq = token_values(2, dtype, low=-3.0, high=-0.5)  # log sum_v p_v^2 <= 0
        loss = compute(loss_types, policy, reference, log_sum_sq, **options)
        (gradient,) = torch.autograd.grad(loss, policy)
        results.append((loss.detach(), gradient))
    (trl_loss, trl_gradient), (loss, gradient) = results
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(loss, trl_loss, **tolerance)
    torch.testing.assert_close(gradient, trl_gradient, **tolerance)
    assert gradient.abs().sum() > 0


# --- 1. several loss types with weights; sft, sigmoid_norm ------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_types", "loss_weights", "label_smoothing"),
    [(["sft"], None, 0.0), (["sigmoid_norm"], None, 0.0), (["aot_unpaired"], None, 0.0), (["aot_unpaired"], None, 0.2),
     (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0), (["sigmoid", "bco_pair", "sft"], None, 0.0),
     (["ipo", "sigmoid_norm", "nca_pair"], [0.3, 1.5, 0.7], 0.0), (["robust", "sft"], [1.0, 0.5], 0.2)],
)  # fmt: skip
def test_loss_lists_and_the_new_loss_types_match_trl(loss_types, loss_weights, label_smoothing):
    assert_same_loss_and_gradient(loss_types, loss_weights=loss_weights, label_smoothing=label_smoothing)


def test_loss_list_is_the_weighted_sum_of_its_terms():
    logps = PairLogps(*(torch.tensor([x], dtype=torch.float64) for x in (-1.0, -3.0, -2.0, -2.0)),
                      torch.tensor([2]), torch.tensor([4]))  # fmt: skip
    losses, terms = dpo_loss_terms(logps, ["sigmoid", "sft"], LossKnobs(beta=0.5), loss_weights=[0.8, 1.0])
    # sigmoid: margin h = 2, -log s(1) = ln(1 + e^-1); sft: -(-1) / 2 tokens = 0.5
    assert terms["sigmoid"].item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-12)
    assert terms["sft"].item() == pytest.approx(0.5, abs=1e-12)
    assert losses.item() == pytest.approx(0.8 * math.log1p(math.exp(-1)) + 0.5, abs=1e-12)


def test_sigmoid_norm_divides_each_log_ratio_by_its_length():
    # log-ratios +1 (2 tokens) and -1 (4 tokens): -log s(0.5 * (1/2 + 1/4)) = ln(1 + e^-0.375)
    losses, _, _ = dpo_loss(
        *(torch.tensor([x], dtype=torch.float64) for x in (-1.0, -3.0, -2.0, -2.0)),
        beta=0.5,
        loss_type="sigmoid_norm",
        chosen_tokens=torch.tensor([2]),
        rejected_tokens=torch.tensor([4]),
    )
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.375)), abs=1e-12)


# --- 2. LD-DPO, WPO, f-divergences ------------------------------------------------------------------------------


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_types", [["sigmoid"], ["ipo"], ["sigmoid", "bco_pair", "sft"], ["aot"]])
def test_ld_alpha_matches_trl(ld_alpha, loss_types):
    assert_same_loss_and_gradient(loss_types, ld_alpha=ld_alpha)


def test_ld_token_weights_by_hand():
    # chosen 2 tokens, rejected 4: both keep their first 2 tokens whole, the rejected answer's last 2 count alpha
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert ld_token_weights(mask, 0.25).tolist() == [[0, 1, 1, 0, 0, 0], [0, 1, 1, 0.25, 0.25, 0]]


@pytest.mark.parametrize("loss_types", [["sigmoid"], ["ipo"], ["sigmoid", "bco_pair"], ["nca_pair"], ["sigmoid_norm"]])
@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_wpo_weighting_matches_trl(loss_types, ld_alpha):
    assert_same_loss_and_gradient(loss_types, use_weighting=True, ld_alpha=ld_alpha)


def test_wpo_weighting_of_sft_where_trl_raises():
    """TRL 1.16 scales the sft term in place (`*=`) on an expanded view of its batch value and raises; ours scales it
    as any other term: mean over pairs of w_i * NLL, NLL the batch's chosen-token mean."""
    policy, reference, log_sum_sq = token_values(0), token_values(1), token_values(2, low=-3.0, high=-0.5)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        trl_dpo_loss(["sigmoid", "sft"], policy, reference, log_sum_sq, use_weighting=True)
    loss = our_dpo_loss(["sft"], policy, reference, log_sum_sq, use_weighting=True)
    nll = -(policy * ANSWER_MASK)[:3].sum() / ANSWER_MASK[:3].sum()
    torch.testing.assert_close(loss, (wpo_pair_weights(policy, log_sum_sq, ANSWER_MASK) * nll).mean())


def test_wpo_weights_by_hand():
    # one pair, one token each: log p - log sum p^2 = -1 - (-2) = 1 and -0.5 - (-1) = 0.5: weight e^1.5
    mask = torch.ones(2, 1, dtype=torch.bool)
    weights = wpo_pair_weights(torch.tensor([[-1.0], [-0.5]]), torch.tensor([[-2.0], [-1.0]]), mask)
    assert weights.item() == pytest.approx(math.exp(1.5))


@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSSES))
def test_f_divergences_match_trl(f_divergence_type, loss_type):
    smoothing = {"exo_pair": 1e-3, "robust": 0.2}.get(loss_type, 0.0)
    # TRL's alpha-divergence clamps by dtype and knows float16, bfloat16 and float32 only
    # and TRL's exo_pair takes log(eps) of a float32 eps, so it is float32-exact only
    dtype = torch.float32 if f_divergence_type == "alpha_divergence" or loss_type == "exo_pair" else torch.float64
    assert_same_loss_and_gradient([loss_type], dtype=dtype, f_divergence_type=f_divergence_type,
                                  f_alpha_divergence_coef=0.3, label_smoothing=smoothing)  # fmt: skip


@pytest.mark.parametrize("coef", [1.0, 1.7])
def test_alpha_divergence_coefficients_match_trl(coef):
    assert_same_loss_and_gradient(["sigmoid"], dtype=torch.float32, f_divergence_type="alpha_divergence",
                                  f_alpha_divergence_coef=coef)  # fmt: skip


def test_f_divergence_scores_by_hand():
    logratios = torch.tensor([math.log(2.0)], dtype=torch.float64)  # u = 2
    assert f_divergence_score(logratios, "reverse_kl").item() == pytest.approx(math.log(2))
    assert f_divergence_score(logratios, "forward_kl").item() == pytest.approx(0.5)  # 1 - 1/u
    assert f_divergence_score(logratios, "js_divergence").item() == pytest.approx(math.log(4 / 3))  # log(2u/(1+u))
    assert f_divergence_score(logratios, "alpha_divergence", 0.5).item() == pytest.approx((2**-0.5 - 1) / -0.5)


# --- KTO's apo_zero_unpaired ----------------------------------------------------------------------------------------


def trl_apo_zero_unpaired(policy, reference, desirable, *, beta, desirable_weight, undesirable_weight):
    """TRL 1.16's KTOTrainer._compute_loss with loss_type apo_zero_unpaired (no KL completions)."""

    class Model:
        training = True

        def __call__(self, input_ids, **kwargs):
            per_token = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=policy.dtype)
            per_token[:, -1] = policy
            return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                   mean_logits=torch.zeros_like(per_token))  # fmt: skip

    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        loss_type="apo_zero_unpaired", calculate_KL=False, precompute_ref_logps=True, aux_loss_enabled=False,
        model=Model(), accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    ones = torch.ones(len(policy), 3, dtype=torch.long)
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": ones, "label": desirable,
              "ref_logps": reference}  # fmt: skip
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("labels", "weights"), [([True, False, True, False, True], (1.0, 1.0)),
                                                 ([True, True, False, True, True], (0.7, 1.6))])  # fmt: skip
def test_apo_zero_unpaired_matches_trl(labels, weights):
    generator = torch.Generator().manual_seed(3)
    policy, reference = (-30 * torch.rand(5, generator=generator, dtype=torch.float64) for _ in range(2))
    desirable, (desirable_weight, undesirable_weight) = torch.tensor(labels), weights
    options = {"beta": 0.1, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    trl_loss, trl_metrics = trl_apo_zero_unpaired(policy.clone().requires_grad_(True), reference, desirable, **options)
    policy_leaf = policy.clone().requires_grad_(True)
    losses, rewards = apo_zero_unpaired_loss(policy_leaf, reference, desirable, **options)
    torch.testing.assert_close(losses.mean(), trl_loss)
    assert trl_metrics["kl"] == 0.0
    assert rewards[desirable].mean().item() == pytest.approx(trl_metrics["rewards/chosen"])
    # its gradient: -beta lambda_D s'(beta r) for a desirable answer, +beta lambda_U s'(beta r) for the others
    (gradient,) = torch.autograd.grad(losses.mean(), policy_leaf)
    slope = torch.sigmoid(0.1 * (policy - reference)) * torch.sigmoid(-0.1 * (policy - reference)) * 0.1 / 5
    expected = torch.where(desirable, -desirable_weight * slope, undesirable_weight * slope)
    torch.testing.assert_close(gradient, expected)


def test_kto_module_with_apo_zero_unpaired_scores_no_kl_rows():
    rows = [TokenizedUnpaired([1, 40], [50, 2], [60, 61, 2], 0, True),
            TokenizedUnpaired([1, 41], [60, 61, 2], [50, 2], 1, False)]  # fmt: skip
    batch = collate_unpaired(rows, pad_id=3, pad_to_multiple_of=1)
    torch.manual_seed(0)
    module = KTO(base="tiny", load_in_4bit=False, loss_type="apo_zero_unpaired", reference_cache=False)
    module.configure_model()
    loss, metrics = module.compute_loss(batch)
    # step 0: every log-ratio 0: each loss is its weight times 1 - s(0) (desirable) or s(0) (undesirable) = 0.5
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert metrics["kl"].item() == 0.0


# --- the DPO module: flags, refusals, wiring --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"loss_type": ["sigmoid", "sigmoid"]}, "names a loss type twice"),
     ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 weights for 2 loss types"),
     ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, "not defined for loss_type bco_pair"),
     ({"loss_type": ["sigmoid", "aot_unpaired"], "use_weighting": True}, "not defined for loss_type aot_unpaired"),
     ({"ld_alpha": 0.5, "reference_cache": True}, "reference_cache true does not go with --model.ld_alpha"),
     ({"sync_ref_model": True, "reference_cache": True},
      "reference_cache true does not go with --model.sync_ref_model"),
     ({"ref_model_mixup_alpha": 1.0}, "read only with --model.sync_ref_model true"),
     ({"ref_model_sync_steps": 64}, "read only with --model.sync_ref_model true"),
     ({"sync_ref_model": True, "ref_model_mixup_alpha": 0.0}, "ref_model_mixup_alpha must be in (0, 1]"),
     ({"sync_ref_model": True, "ref_model_sync_steps": 0}, "ref_model_sync_steps must be >= 1"),
     ({"ld_alpha": 1.5, "reference_cache": False}, "ld_alpha must be in [0, 1]"),
     ({"f_alpha_divergence_coef": 0.3}, "read only with --model.f_divergence_type alpha_divergence"),
     ({"use_weighting": True, "padding_free": True}, "set --model.padding_free false"),
     ({"loss_type": ["sigmoid", "exo_pair"]}, "exo_pair needs --model.label_smoothing > 0")],
)  # fmt: skip
def test_dpo_refuses_a_knob_its_loss_types_do_not_read_in_one_line(settings, message):
    with pytest.raises(ConfigError, match="--model.") as error:
        DPO(base="tiny", **settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_single_loss_type_stays_a_string_and_the_command_line_takes_a_list():
    from jsonargparse import ArgumentParser

    assert DPO(base="tiny", loss_type="sigmoid").hparams.loss_type == "sigmoid"  # what older checkpoints hold
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DPO, "model")
    assert parser.parse_args(["--model.loss_type", "sigmoid"]).model.loss_type == "sigmoid"
    config = parser.parse_args(
        ["--model.loss_type", "[sigmoid, bco_pair, sft]", "--model.loss_weights", "[0.8, 0.2, 1]"]
    )
    assert config.model.loss_type == ["sigmoid", "bco_pair", "sft"] and config.model.loss_weights == [0.8, 0.2, 1.0]


def build_dpo(**settings) -> DPO:
    torch.manual_seed(0)
    module = DPO(base="tiny", load_in_4bit=False, lora_dropout=0.0, **settings)
    module.configure_model()
    with torch.no_grad():  # adapters away from zero, so that the policy differs from the reference
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return module


def test_per_token_log_probs_sum_to_the_plain_paths():
    module = build_dpo()
    token_logps, answer_mask, _ = module.token_logps(literal_batch())
    torch.testing.assert_close(token_logps.sum(-1), torch.cat(module.sequence_logps(literal_batch(), average=False)))
    assert answer_mask.sum().item() == 3 + 4 + 2 + 5  # the literal batch's answer tokens


def test_dpo_module_composes_ld_wpo_and_the_loss_list_as_the_pure_functions():
    settings = {"loss_type": ["sigmoid", "ipo", "sft"], "loss_weights": [0.8, 0.3, 1.0], "ld_alpha": 0.4,
                "use_weighting": True, "f_divergence_type": "js_divergence", "reference_cache": False}  # fmt: skip
    module = build_dpo(**settings)
    batch = literal_batch()
    loss, metrics = module.compute_loss(batch)
    with torch.no_grad():
        policy, mask, log_sum_sq = module.token_logps(batch, wpo=True)
        with module.reference_model():
            reference, _, _ = module.token_logps(batch)
        # the same logits give WPO's log sum_v p_v^2: checked against the softmax itself
        logits = module(batch.input_ids, batch.attention_mask)[:, :-1].double()
        torch.testing.assert_close(
            log_sum_sq.double(), torch.log((logits.softmax(-1) ** 2).sum(-1)), rtol=1e-5, atol=1e-5
        )
    weights = ld_token_weights(mask, 0.4)
    logps = PairLogps(*(policy * weights).sum(-1).chunk(2), *(reference * weights).sum(-1).chunk(2),
                      *mask.sum(-1).chunk(2), policy.sum(-1).chunk(2)[0])  # fmt: skip
    knobs = LossKnobs(0.1, f_divergence_type="js_divergence")
    expected, terms = dpo_loss_terms(logps, ["sigmoid", "ipo", "sft"], knobs, loss_weights=[0.8, 0.3, 1.0],
                                     pair_weights=wpo_pair_weights(policy, log_sum_sq, mask))  # fmt: skip
    torch.testing.assert_close(loss, expected.mean())
    for loss_type, term in terms.items():
        torch.testing.assert_close(metrics[f"loss/{loss_type}"], term)
    assert "train/loss/sft" in {f"train/{name}" for name in module.metric_names}


def test_the_reference_cache_left_out_is_off_where_the_reference_cannot_be_cached():
    assert DPO(base="tiny").reference.cache  # the default: on
    assert not DPO(base="tiny", ld_alpha=0.5).reference.cache
    assert not DPO(base="tiny", sync_ref_model=True).reference.cache
    assert DPO(base="tiny", sync_ref_model=True).hparams.reference_cache is None  # the config says what was given


def test_ld_alpha_one_and_reverse_kl_give_the_plain_loss():
    plain = build_dpo(loss_type="sigmoid", reference_cache=False).compute_loss(literal_batch())[0]
    ld = build_dpo(loss_type="sigmoid", ld_alpha=1.0, reference_cache=False).compute_loss(literal_batch())[0]
    torch.testing.assert_close(ld, plain)
