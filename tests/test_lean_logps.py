"""The lean log-prob path (final hidden states, logits a chunk at a time) against the plain full-logits path.

Tolerances: fp32 on CPU, 1e-5 relative (and 1e-5 absolute) on per-sequence log-probs, losses, metrics and
gradients; the two paths differ only in the order of fp32 sums. Under bf16 autocast both round the logits to
bf16 the same way: 1e-2 absolute on a sum over ~10 tokens.
"""

import pytest
import torch

from alignment import DPO, ORPO
from alignment.logprobs import sequence_logps, sequence_logps_from_hidden
from alignment.model.load import add_lora, load_base
from tests.helpers import literal_batch

TIGHT = {"rtol": 1e-5, "atol": 1e-5}
V, H = 97, 16


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (4, 9, H), head weight (V, H), labels (4, 9) with prompt/padding holes and one row with no label."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 9, H, generator=generator)
    weight = torch.randn(V, H, generator=generator) / H**0.5
    labels = torch.randint(0, V, (4, 9), generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    labels[2] = -100  # no answer token at all
    return hidden, weight, labels


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 21, 1000, None])  # 21 label positions: 7 divides them, 4 leaves 1
def test_values_and_gradients_match_the_plain_path(average, chunk_size):
    hidden, weight, labels = problem()
    assert (labels != -100).sum() == 21
    plain_hidden = hidden.clone().requires_grad_()
    lean_hidden = hidden.clone().requires_grad_()
    plain = sequence_logps(plain_hidden @ weight.T, labels, average=average)
    lean = sequence_logps_from_hidden(lean_hidden, weight, labels, average=average, chunk_size=chunk_size)
    torch.testing.assert_close(lean, plain, **TIGHT)
    assert lean.dtype == torch.float32 and lean[2].item() == 0.0  # a row with no answer token is 0, not NaN
    upstream = torch.tensor([0.3, -1.2, 0.7, 2.0])  # any per-sequence gradient, as a loss would send
    (plain * upstream).sum().backward()
    (lean * upstream).sum().backward()
    torch.testing.assert_close(lean_hidden.grad, plain_hidden.grad, **TIGHT)
    assert lean_hidden.grad[2].abs().sum() == 0 and lean_hidden.grad[0, :3].abs().sum() == 0


@pytest.mark.parametrize("average", [False, True])
def test_float64_stays_float64_and_matches_the_plain_path(average):
    hidden, weight, labels = problem(2)
    hidden, weight = hidden.double(), weight.double()
    plain_hidden, lean_hidden = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    plain = sequence_logps(plain_hidden @ weight.T, labels, average=average)
    lean = sequence_logps_from_hidden(lean_hidden, weight, labels, average=average, chunk_size=4)
    assert lean.dtype == plain.dtype == torch.float64
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-12)
    upstream = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    (plain * upstream).sum().backward()
    (lean * upstream).sum().backward()
    assert lean_hidden.grad.dtype == torch.float64
    torch.testing.assert_close(lean_hidden.grad, plain_hidden.grad, rtol=0, atol=1e-12)
    # both against log_softmax in float64, position by position
    token_logps = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels != -100
    expected = (token_logps * mask).sum(-1)
    if average:
        expected = expected / mask.sum(-1).clamp(min=1)
    torch.testing.assert_close(lean.detach(), expected, rtol=0, atol=1e-12)


def test_bf16_autocast_rounds_logits_as_the_plain_path_does():
    hidden, weight, labels = problem(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = sequence_logps(hidden @ weight.T, labels)
        lean = sequence_logps_from_hidden(hidden, weight, labels, chunk_size=5)
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-2)


def test_no_gradient_work_under_no_grad_and_a_trainable_head_is_refused():
    hidden, weight, labels = problem()
    with torch.no_grad():
        out = sequence_logps_from_hidden(hidden.requires_grad_(), weight.requires_grad_(), labels)
    assert out.grad_fn is None
    with pytest.raises(NotImplementedError, match="plain path"):
        sequence_logps_from_hidden(hidden, weight, labels)


def test_no_vocabulary_sized_tensor_is_kept_for_backward():
    """What autograd saves between forward and backward: the plain path keeps (B, T, V) logits; the lean
    path nothing with a vocabulary dimension (the chunks' logits live only inside its forward)."""
    hidden, weight, labels = problem()

    def saved_shapes(compute) -> list[torch.Size]:
        shapes = []

        def pack(tensor):
            shapes.append(tensor.shape)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            compute(hidden.clone().requires_grad_())
        return shapes

    plain = saved_shapes(lambda h: sequence_logps(h @ weight.T, labels))
    lean = saved_shapes(lambda h: sequence_logps_from_hidden(h, weight, labels, chunk_size=4))
    assert any(V in shape for shape in plain)  # the check can see the logits when they are there
    assert lean and not any(V in shape for shape in lean)


def module_pair(cls, **kwargs):
    """The same seeded policy twice, lean and plain; LoRA B made nonzero so policy and reference differ."""
    modules = []
    for lean in (True, False):
        torch.manual_seed(0)
        module = cls(lean_logps=lean, gradient_checkpointing=True, **kwargs)
        module.configure_model()
        generator = torch.Generator().manual_seed(1)
        for name, param in sorted(module.policy.named_parameters()):
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05, generator=generator)
        modules.append(module)
    return modules


def loss_metrics_grads(module):
    loss, metrics = module.compute_loss(literal_batch())
    loss.backward()
    grads = {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}
    return loss, metrics, grads


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(DPO, {}), (DPO, {"loss_type": "ipo"}), (ORPO, {}), (ORPO, {"logits_chunk_size": 3})],
)
def test_module_losses_metrics_and_lora_gradients_match(cls, kwargs):
    if cls is DPO:
        kwargs = {**kwargs, "reference_cache": False}  # the reference forward runs too, with adapters off
    lean, plain = module_pair(cls, **kwargs)
    assert lean._lean_head_weight() is not None and plain._lean_head_weight() is None
    lean_loss, lean_metrics, lean_grads = loss_metrics_grads(lean)
    plain_loss, plain_metrics, plain_grads = loss_metrics_grads(plain)
    torch.testing.assert_close(lean_loss, plain_loss, **TIGHT)
    for name in plain_metrics:
        torch.testing.assert_close(lean_metrics[name], plain_metrics[name], **TIGHT, msg=name)
    assert lean_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(lean_grads[name], grad, **TIGHT, msg=name)


def test_a_head_with_adapters_falls_back_to_full_logits():
    module = ORPO(lean_logps=True, lora_target_modules=["q_proj", "lm_head"])
    module.configure_model()
    assert module._lean_head_weight() is None
    loss, _ = module.compute_loss(literal_batch())
    assert torch.isfinite(loss)


def test_4bit_base_keeps_embeddings_and_head_in_the_16bit_compute_dtype():
    """Norms and adapters fp32 (as peft prepares a k-bit base); the vocabulary-sized weights stay 16-bit."""
    policy = add_lora(load_base("tiny", compute_dtype=torch.bfloat16), gradient_checkpointing=True)
    dtypes = {name: param.dtype for name, param in policy.named_parameters()}
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["base_model.model.lm_head.weight"] == torch.bfloat16
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "norm" in name or "lora_" in name)
    batch = literal_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (2B, T, V)
    sequence_logps(logits[:, :-1], batch.labels[:, 1:]).sum().backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
