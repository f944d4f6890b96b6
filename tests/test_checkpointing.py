"""Selective gradient checkpointing (`--model.gradient_checkpointing selective`): the gradients of full checkpointing
and of none, with none of the 4-bit base's matrix products redone in backward, where full checkpointing redoes
every one."""

from collections import Counter

import bitsandbytes as bnb
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignment import ORPO
from tests.helpers import literal_batch
from tests.test_usage import error_line

MODES = [False, True, "selective"]
BASE_PRODUCT = "bitsandbytes::gemm_4bit"  # a 4-bit layer's product with its input


class OpCounter(TorchDispatchMode):
    """Counts the operators run while it is on."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def module(mode) -> ORPO:
    torch.manual_seed(0)
    built = ORPO(base="tiny", load_in_4bit=True, gradient_checkpointing=mode)
    built.configure_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(built.policy.named_parameters()):
            if "lora_B" in name:  # nonzero, so that every adapter gets a gradient
                param.normal_(std=0.1, generator=generator)
    return built


def step(built: ORPO) -> tuple[dict[str, torch.Tensor], Counter, Counter, int]:
    """LoRA gradients of one loss, the operators of its forward and of its backward, the 4-bit layers."""
    built.zero_grad()
    with OpCounter() as forward:
        loss, _ = built.compute_loss(literal_batch())
    with OpCounter() as backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in built.policy.named_parameters() if p.requires_grad}
    layers = sum(isinstance(m, bnb.nn.Linear4bit) for m in built.policy.modules())
    return grads, forward.counts, backward.counts, layers


@pytest.fixture(scope="module")
def steps():
    return {mode: step(module(mode)) for mode in MODES}


def test_selective_checkpointing_gives_the_gradients_of_full_checkpointing_and_of_none(steps):
    grads = {mode: steps[mode][0] for mode in MODES}
    assert grads["selective"].keys() == grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name, full in grads[True].items():
        assert full.abs().sum() > 0, name
        assert torch.equal(grads["selective"][name], full), name  # the same products, kept instead of redone
        torch.testing.assert_close(grads["selective"][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_selective_checkpointing_redoes_no_product_of_the_base_in_backward(steps):
    layers = steps[False][3]  # the 4-bit linear layers of the decoder (the LM head stays 16-bit)
    assert layers > 0 and all(steps[mode][1][BASE_PRODUCT] >= layers for mode in MODES)
    assert steps[True][2][BASE_PRODUCT] == layers  # full checkpointing runs each layer's forward again
    assert steps["selective"][2][BASE_PRODUCT] == 0  # kept from the forward
    assert steps[False][2][BASE_PRODUCT] == 0
    # the elementwise work is what selective checkpointing still redoes
    assert steps["selective"][2]["aten::silu"] == steps[True][2]["aten::silu"] > 0


@pytest.mark.slow
def test_a_mode_that_is_not_one_is_one_line(tmp_path):
    from tests.test_cli import run_cli

    result = run_cli("fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--model.gradient_checkpointing", "some")  # fmt: skip
    assert "--model.gradient_checkpointing" in error_line(result)
