"""TR-DPO (--model.sync_ref_model): the reference is a second LoRA adapter that starts as the bare base and moves
toward the policy's adapter every ref_model_sync_steps optimizer steps, by TRL's soft update of each parameter.

On the tiny model: the reference adapter after N steps equals the mixture written out by hand from the policy's
adapters at the update steps; step 0's loss is ln 2, and so is the loss right after a hard update (alpha 1); a run
stopped and resumed ends with the same adapter and the same reference adapter, bit for bit, as one that never
stopped.
"""

import math

import lightning as L
import pytest
import torch

from alignment import DPO, PreferenceDataModule
from alignment.model.load import REFERENCE_ADAPTER
from tests.helpers import SignalAtStep, literal_batch, synthetic_pairs, write_jsonl
from tests.test_resume import assert_same_adapters, run


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(18, seed=0))


class PolicySnapshots(L.Callback):
    """The policy's adapter before training (step 0) and after each optimizer step, by step."""

    def __init__(self):
        self.adapters: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.adapters[0] = _policy_adapter(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.adapters[trainer.global_step] = _policy_adapter(pl_module)


def _policy_adapter(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def fit(pairs, root, *, max_steps, callbacks=(), **settings) -> tuple[L.Trainer, DPO]:
    L.seed_everything(7)
    module = DPO(base="tiny", load_in_4bit=False, learning_rate=1e-2, sync_ref_model=True, **settings)
    data = PreferenceDataModule(str(pairs), max_length=64, batch_size=2, val_fraction=0.2, seed=3)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
                        default_root_dir=root)  # fmt: skip
    trainer.fit(module, data)
    return trainer, module


def test_the_reference_adapter_is_the_hand_computed_mixture_of_the_policy_at_the_update_steps(pairs, tmp_path):
    snapshots = PolicySnapshots()
    trainer, module = fit(pairs, tmp_path, max_steps=5, callbacks=[snapshots], ref_model_sync_steps=2,
                          ref_model_mixup_alpha=0.6)  # fmt: skip
    assert trainer.global_step == 5 and module.reference_synced_step == 4  # moved after steps 2 and 4, not 1, 3, 5
    policy = snapshots.adapters
    for name, reference in module.reference_adapter().items():
        start = policy[0][name]  # the reference starts as the policy's new adapter: the bare base
        expected = 0.6 * policy[4][name] + 0.4 * (0.6 * policy[2][name] + 0.4 * start)
        torch.testing.assert_close(reference, expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(reference, policy[5][name])  # it lags the policy
    b_weights = [value for name, value in module.reference_adapter().items() if "lora_B" in name]
    assert all(value.abs().max() > 0 for value in b_weights)  # it moved off the bare base
    assert all(not p.requires_grad for n, p in module.named_parameters() if f".{REFERENCE_ADAPTER}." in n)


def test_step_0_loss_is_ln_2_and_again_right_after_a_hard_update(pairs, tmp_path):
    torch.manual_seed(0)
    module = DPO(base="tiny", load_in_4bit=False, sync_ref_model=True)
    module.configure_model()
    loss, metrics = module.compute_loss(literal_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"].abs().max() == 0 and metrics["rewards/rejected"].abs().max() == 0

    trainer, module = fit(pairs, tmp_path, max_steps=2, ref_model_sync_steps=2, ref_model_mixup_alpha=1.0)
    module.policy.eval()
    before, _ = module.compute_loss(literal_batch())  # the reference is still the base: the policy has moved
    module.sync_reference_if_due()  # step 2: the reference becomes the policy
    after, metrics = module.compute_loss(literal_batch())
    assert abs(before.item() - math.log(2)) > 1e-3
    assert after.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"].abs().max() < 1e-6


@pytest.mark.slow
def test_a_stopped_run_resumes_with_the_same_adapter_and_reference_bit_exact(pairs, tmp_path):
    """Stopped at step 4: its checkpoint holds the reference moved at step 2 and is written before step 4's update,
    which the resumed run makes."""
    settings = {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.6}
    whole, uninterrupted = run(DPO, pairs, tmp_path / "whole", max_steps=6, **settings)
    stopped, _ = run(DPO, pairs, tmp_path / "split", max_steps=6, extra_callbacks=[SignalAtStep(4)], **settings)
    assert stopped.global_step == 4
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["moving_reference"]["synced_step"] == 2
    resumed, adapters = run(DPO, pairs, tmp_path / "split", max_steps=6, ckpt_path=str(last), **settings)
    assert_same_adapters(adapters, uninterrupted)
    reference, expected = resumed.lightning_module.reference_adapter(), whole.lightning_module.reference_adapter()
    assert_same_adapters(reference, expected)
    assert whole.lightning_module.reference_synced_step == 4  # step 6's update would come before a step 7
    assert any(not torch.equal(reference[n], adapters[n]) for n in reference)  # a reference apart from the policy
