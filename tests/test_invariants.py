"""Invariants of training on the real 4-bit path (bitsandbytes nf4 on CPU), tiny model."""

import math

import pytest
import torch

from alignment import DPO, ORPO
from alignment.model.load import load_base
from tests.helpers import PAIR_METHODS, literal_batch


def build(cls, **kwargs):
    torch.manual_seed(0)
    module = cls(**{"base": "tiny", "load_in_4bit": True, **kwargs})
    module.configure_model()
    return module


def base_weights(module) -> dict[str, torch.Tensor]:
    """The whole base in the state dict: 4-bit packed weights with their quantization state, norms, embeddings."""
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items() if "lora_" not in k}


def adapter_weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}


def test_base_is_4bit_and_only_lora_is_trainable():
    module = build(DPO)
    linear = module.policy.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert linear.weight.__class__.__name__ == "Params4bit"
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("load_in_4bit", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_dpo_loss_is_ln2_and_rewards_zero_at_step_0(loss_type, load_in_4bit):
    torch.manual_seed(0)
    module = DPO(base="tiny", load_in_4bit=load_in_4bit, loss_type=loss_type, label_smoothing=0.1)
    module.configure_model()
    loss, metrics = module.compute_loss(literal_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        torch.testing.assert_close(metrics[name], torch.zeros(2), rtol=0, atol=0)
    assert torch.all(metrics["logps/chosen"] < -1)  # real log-probs, not zeros


@pytest.mark.parametrize("cls", PAIR_METHODS)
def test_one_optimizer_step_moves_every_adapter_and_no_base_weight(cls):
    module = build(cls, lora_dropout=0.1)
    with torch.no_grad():  # LoRA B starts at zero, which gives A no gradient; start from a trained-like state
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    module.train()
    before_base, before_lora = base_weights(module), adapter_weights(module)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss, _ = module.compute_loss(literal_batch())
    loss.backward()
    optimizer.step()
    after_base, after_lora = base_weights(module), adapter_weights(module)
    assert before_base.keys() == after_base.keys() and len(before_base) > 0
    for name in before_base:  # 4-bit packed weights, quantization state, norms, embeddings
        assert torch.equal(before_base[name], after_base[name]), f"base weight {name} moved"
    unchanged = [n for n in before_lora if torch.equal(before_lora[n], after_lora[n])]
    assert not unchanged, f"adapters that did not move: {unchanged}"


def test_adapters_disabled_equals_base_and_reenabling_restores_policy():
    module = build(DPO)
    with torch.no_grad():  # give the adapters a visible effect
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    batch = literal_batch()
    reference = load_base("tiny", load_in_4bit=True)
    module.eval()
    with torch.no_grad():
        base_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        policy_logits = module(batch.input_ids, batch.attention_mask)
        with module.policy.disable_adapter():
            disabled_logits = module(batch.input_ids, batch.attention_mask)
        again = module(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(disabled_logits, base_logits, rtol=0, atol=0)
    assert not torch.allclose(policy_logits, base_logits)
    torch.testing.assert_close(again, policy_logits, rtol=0, atol=0)


def test_orpo_loss_is_chosen_nll_plus_odds_ratio_term():
    """The loss rebuilt from the policy's per-token mean log-probs alone (Hong et al. 2024, eq. 6), in float64."""
    module = build(ORPO, beta=0.25)
    batch = literal_batch()
    loss, _ = module.compute_loss(batch)
    with torch.no_grad():
        chosen, rejected = (logps.double() for logps in module.sequence_logps(batch, average=True))
    log_odds = [logps - torch.log(-torch.expm1(logps)) for logps in (chosen, rejected)]  # log p / (1 - p)
    expected = (-chosen - 0.25 * torch.nn.functional.logsigmoid(log_odds[0] - log_odds[1])).mean()
    assert torch.all(chosen < 0) and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_validation_pass_does_not_change_training_gradients():
    """An eval-mode, no-grad pass (validation) must leave the training path and its gradients as they were."""
    module = build(DPO)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)

    def gradients():
        module.train()
        module.zero_grad()
        loss, _ = module.compute_loss(literal_batch())
        loss.backward()
        return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}

    before = gradients()
    module.eval()
    with torch.no_grad():
        module.compute_loss(literal_batch())
    after = gradients()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


def _grads(module, batches: list) -> dict[str, torch.Tensor]:
    module.zero_grad()
    for batch in batches:
        loss, _ = module.compute_loss(batch)
        (loss / len(batches)).backward()  # what Lightning does with accumulate_grad_batches
    return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}


def _perturbed(cls, **kwargs):
    module = build(cls, load_in_4bit=False, **kwargs)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return module


@pytest.mark.parametrize("cls", PAIR_METHODS)
def test_gradient_accumulation_of_single_pairs_equals_one_batch(cls):
    from alignment.data import TokenizedPair, collate_pairs

    pairs = [TokenizedPair([1, 40 + i, 41], [50 + i, 51, 2], [60, 61 + i, 62, 2][: 2 + i % 3], i) for i in range(4)]
    module = _perturbed(cls)
    whole = _grads(module, [collate_pairs(pairs, pad_id=3)])
    accumulated = _grads(module, [collate_pairs([p], pad_id=3) for p in pairs])
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = _grads(_perturbed(ORPO), [literal_batch()])
    checkpointed = _grads(_perturbed(ORPO, gradient_checkpointing=True), [literal_batch()])
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
