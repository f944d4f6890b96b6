"""bitsandbytes' packed CPU kernel for 4-bit weights (AVX512-BF16 CPUs) has no backward: a model that trains on it,
as one does after any no-grad eval forward (a reference pass, a validation), gets wrong LoRA gradients. Our loader
switches the packing off (`alignment.model.load._keep_cpu_4bit_differentiable`); bitsandbytes leaves it on, so a
trainer that does not (TRL 1.16's DPOTrainer with precompute_ref_log_probs) trains on it."""

from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit

from alignment.model.load import CPU_PACKING_FLAG, add_lora, load_base

AVX512_BF16 = Path("/proc/cpuinfo").is_file() and "avx512_bf16" in Path("/proc/cpuinfo").read_text()
pytestmark = pytest.mark.skipif(not AVX512_BF16, reason="bitsandbytes packs 4-bit weights only on AVX512-BF16 CPUs")


def policy_with_lora(packing: bool):
    """The tiny nf4 base with LoRA, seeded; `packing` True is bitsandbytes' own default, False our loader's."""
    torch.manual_seed(0)
    base = load_base("tiny", load_in_4bit=True)
    for layer in base.modules():
        if isinstance(layer, Linear4bit):
            setattr(layer, CPU_PACKING_FLAG, packing)
    torch.manual_seed(1)
    policy = add_lora(base, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():  # B is 0 at init: moved, so that every layer's LoRA passes gradient down
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return policy


def lora_gradients(policy, ids: torch.Tensor, *, eval_first: bool) -> tuple[dict[str, torch.Tensor], int]:
    """(LoRA gradients of one training step, count of packed 4-bit layers), the step taken after a no-grad eval
    forward (what a reference pass or a validation does) when `eval_first`."""
    if eval_first:
        policy.eval()
        with torch.no_grad():
            policy(input_ids=ids)
    packed = sum(bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
                 for layer in policy.modules() if isinstance(layer, Linear4bit))  # fmt: skip
    policy.train()
    policy(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}, packed


@pytest.mark.filterwarnings("ignore:bitsandbytes::gemv_4bit. an autograd kernel was not registered")
def test_the_packed_kernel_gives_wrong_lora_gradients_and_ours_never_packs():
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, ours_packed = lora_gradients(policy_with_lora(False), ids, eval_first=True)
    theirs, theirs_packed = lora_gradients(policy_with_lora(True), ids, eval_first=True)
    never_evaluated, _ = lora_gradients(policy_with_lora(False), ids, eval_first=False)
    assert ours_packed == 0 and theirs_packed == 14  # every 4-bit layer of the 2-layer model
    assert all(torch.equal(ours[n], never_evaluated[n]) for n in ours)  # the eval forward changed nothing of ours
    errors = sorted(((theirs[n] - ours[n]).norm() / ours[n].norm()).item() for n in ours)
    # not bf16 rounding (the packed kernel computes in bf16: ~1e-2 at most): most gradients are mostly wrong
    assert errors[len(errors) // 2] > 0.5, errors
