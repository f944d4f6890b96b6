"""sequence_logps against hand-built logits whose log-softmax is known exactly."""

import math

import pytest
import torch

from alignment.logprobs import sequence_logps

LN3 = math.log(3.0)


def hand_logits(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 3, 2): position 0 uniform -> p = 1/2 each; positions 1-2 [ln 3, 0] -> p = 3/4, 1/4."""
    return torch.tensor([[[0.0, 0.0], [LN3, 0.0], [LN3, 0.0]]], dtype=dtype)


def test_sum_of_token_logps():
    # labels 0, 0, 1: ln(1/2) + ln(3/4) + ln(1/4) = ln(3/32)
    out = sequence_logps(hand_logits(), torch.tensor([[0, 0, 1]]))
    torch.testing.assert_close(out, torch.tensor([-2.367123614131617]), rtol=0, atol=1e-6)


def test_mean_of_token_logps():
    # ln(3/32) / 3
    out = sequence_logps(hand_logits(), torch.tensor([[0, 0, 1]]), average=True)
    torch.testing.assert_close(out, torch.tensor([-0.789041204710539]), rtol=0, atol=1e-6)


def test_three_token_vocabulary():
    # [0, 0, 0] -> ln(1/3); [ln 2, 0, 0] -> token 0 has p = 2/4: ln(1/3) + ln(1/2) = -ln 6
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]]])
    out = sequence_logps(logits, torch.tensor([[2, 0]]))
    torch.testing.assert_close(out, torch.tensor([-1.791759469228055]), rtol=0, atol=1e-6)


def test_ignored_positions_are_skipped_in_sum_and_mean():
    # position 1 ignored: sum = ln(1/2) + ln(1/4), mean over the 2 kept tokens
    labels = torch.tensor([[0, -100, 1]])
    total = sequence_logps(hand_logits(), labels)
    mean = sequence_logps(hand_logits(), labels, average=True)
    torch.testing.assert_close(total, torch.tensor([-2.0794415416798357]), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean, torch.tensor([-1.0397207708399179]), rtol=0, atol=1e-6)


def test_logits_at_ignored_positions_do_not_matter():
    labels = torch.tensor([[0, -100, 1]])
    changed = hand_logits()
    changed[0, 1] = torch.tensor([1e4, -1e4])
    for average in (False, True):
        torch.testing.assert_close(
            sequence_logps(changed, labels, average=average),
            sequence_logps(hand_logits(), labels, average=average),
            rtol=0,
            atol=0,
        )


def test_custom_ignore_index():
    out = sequence_logps(hand_logits(), torch.tensor([[0, 7, 1]]), ignore_index=7)
    torch.testing.assert_close(out, torch.tensor([-2.0794415416798357]), rtol=0, atol=1e-6)


def test_all_ignored_row_is_zero_not_nan():
    logits = torch.cat([hand_logits(), hand_logits()])  # (2, 3, 2)
    labels = torch.tensor([[0, 0, 1], [-100, -100, -100]])
    for average in (False, True):
        out = sequence_logps(logits, labels, average=average)
        assert not torch.isnan(out).any()
        assert out[1].item() == 0.0


def test_rows_are_independent():
    logits = torch.cat([hand_logits(), hand_logits()])
    out = sequence_logps(logits, torch.tensor([[0, 0, 1], [1, 1, 0]]))
    # row 1: ln(1/2) + ln(1/4) + ln(3/4) = ln(3/32), same as row 0
    torch.testing.assert_close(out, torch.tensor([-2.367123614131617, -2.367123614131617]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("logits_shape", "labels_shape"),
    [((2, 5, 11), (2, 4)), ((2, 5, 11), (3, 5)), ((2, 5, 11), (2, 5, 11))],
)
def test_mismatched_shapes_raise(logits_shape, labels_shape):
    with pytest.raises(ValueError, match="are not aligned"):
        sequence_logps(torch.zeros(logits_shape), torch.zeros(labels_shape, dtype=torch.long))


def test_bf16_logits_return_float32_close_to_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    out = sequence_logps(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    # same values once rounded to bf16, computed in fp32
    torch.testing.assert_close(out, sequence_logps(logits.bfloat16().float(), labels), rtol=0, atol=1e-5)
    # bf16 keeps ~3 significant digits: a 5-token sum stays within 0.05 of the fp32 result
    torch.testing.assert_close(out, sequence_logps(logits, labels), rtol=0, atol=5e-2)


def test_fp32_output_dtype():
    assert sequence_logps(hand_logits(), torch.tensor([[0, 0, 1]])).dtype == torch.float32


@pytest.mark.parametrize("average", [False, True])
def test_matches_log_softmax_gather(average):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    mask = labels != -100
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    expected = token_logps.sum(-1)
    if average:
        expected = expected / mask.sum(-1)
    torch.testing.assert_close(sequence_logps(logits, labels, average=average), expected, rtol=1e-5, atol=1e-5)


def test_gradient_flows_to_logits():
    logits = hand_logits().requires_grad_()
    sequence_logps(logits, torch.tensor([[0, -100, 1]])).sum().backward()
    # d log_softmax(x)[y] / dx = onehot(y) - softmax(x); ignored position gets zero gradient
    expected = torch.tensor([[[0.5, -0.5], [0.0, 0.0], [-0.75, 0.75]]])
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-6)


# --- precision: float32 at least, never below the input's ----------------------------------------------------------


def reference_logps(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per-sequence sums in Python floats (float64): log p = x[y] - max - log(sum exp(x - max)), math.fsum."""
    sums = []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist(), strict=True):
        terms = []
        for scores, label in zip(row_logits, row_labels, strict=True):
            if label != -100:
                top = max(scores)
                terms.append(scores[label] - top - math.log(math.fsum(math.exp(s - top) for s in scores)))
        sums.append(math.fsum(terms))
    return sums


def test_float64_logits_are_not_rounded_to_float32():
    # ln(3/32) from logits that hold ln 3 to float64 precision
    out = sequence_logps(hand_logits(torch.float64), torch.tensor([[0, 0, 1]]))
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(math.log(3 / 32), rel=0, abs=1e-14)
    mean = sequence_logps(hand_logits(torch.float64), torch.tensor([[0, 0, 1]]), average=True)
    assert mean.item() == pytest.approx(math.log(3 / 32) / 3, rel=0, abs=1e-14)


def test_float64_logits_of_a_wide_vocabulary_match_a_float64_computation():
    generator = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(2, 12, 500, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 500, (2, 12), generator=generator)
    labels[0, :4] = -100
    out = sequence_logps(logits, labels)
    expected = torch.tensor(reference_logps(logits, labels), dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_float64_gradient_is_float64_and_exact():
    logits = hand_logits(torch.float64).requires_grad_()
    out = sequence_logps(logits, torch.tensor([[0, -100, 1]]))
    out.sum().backward()
    expected = torch.tensor([[[0.5, -0.5], [0.0, 0.0], [-0.75, 0.75]]], dtype=torch.float64)
    assert logits.grad.dtype == torch.float64
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits_are_computed_in_float32(dtype):
    logits = hand_logits().to(dtype)
    out = sequence_logps(logits, torch.tensor([[0, 0, 1]]))
    assert out.dtype == torch.float32
    expected = sequence_logps(logits.float(), torch.tensor([[0, 0, 1]]))  # same rounded logits, fp32 math
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
