"""bf16 products on a CPU (`--trainer.precision bf16-mixed`: autocast, as on a GPU): the adapters and their
gradients stay fp32, the log-probs and LoRA gradients stay within bf16's tolerance of the fp32 step's, and at step 0
the DPO loss is still ln 2 (policy and reference run the same bf16 products)."""

import math

import pytest
import torch

from tests.helpers import literal_batch
from tests.test_packing import seeded_module

BF16_LOGPS = {"rtol": 2e-2, "atol": 2e-2}  # sums over a few tokens of a 1024-word vocabulary: about -7 a token


def step(module, batch, bf16: bool):
    module.policy.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, metrics = module.compute_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    return loss, metrics, grads


@pytest.mark.parametrize("name", ["DPO", "ORPO"])
def test_bf16_products_keep_fp32_adapters_and_the_fp32_log_probs_and_gradients_within_tolerance(name):
    module, batch = seeded_module(name), literal_batch()
    _, plain, plain_grads = step(module, batch, bf16=False)
    _, mixed, mixed_grads = step(module, batch, bf16=True)
    for metric in ("logps/chosen", "logps/rejected"):
        torch.testing.assert_close(mixed[metric].float(), plain[metric], **BF16_LOGPS, msg=metric)
    assert plain_grads.keys() == mixed_grads.keys() and len(mixed_grads) > 0
    for param_name, grad in mixed_grads.items():
        assert grad.dtype == torch.float32, param_name  # the adapters and their gradients: fp32, as bf16-mixed's
        error = (grad - plain_grads[param_name]).norm() / plain_grads[param_name].norm()
        assert error < 0.05, (param_name, float(error))


def test_bf16_products_give_ln2_at_step_0():
    torch.manual_seed(0)
    import alignment

    module = alignment.DPO(gradient_checkpointing=True, reference_cache=False)
    module.configure_model()  # LoRA's B at 0: the policy is the reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = module.compute_loss(literal_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert (metrics["rewards/chosen"] == 0).all() and (metrics["rewards/rejected"] == 0).all()
