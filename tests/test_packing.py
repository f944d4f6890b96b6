"""Padding-free forwards (alignment/packing.py) against the padded batch they come from.

Tolerances: fp32 on CPU; the packed and padded forwards differ only in the order of float sums (attention over a
block-diagonal mask instead of a padded one; a pair's prompt computed once for both answers), so per-sequence
log-probs, losses, metrics and LoRA gradients agree to 1e-5 relative and 1e-5 absolute (gradients: 1e-4 absolute,
sums over every position of the batch).
"""

import inspect

import pytest
import torch
from transformers.masking_utils import sdpa_mask

import alignment
from alignment.data import IGNORE_INDEX, TokenizedPair, TokenizedUnpaired, collate_pairs, collate_unpaired
from alignment.errors import ConfigError
from alignment.logprobs import sequence_logps, sequence_logps_from_hidden
from alignment.methods import METHODS
from alignment.model import packing
from alignment.model.load import add_lora, load_base
from alignment.model.packing import (
    PACKED_ATTENTION,
    pack_rows,
    pack_shared_prompts,
    packed_sequence_logps,
    sum_per_row,
    use_packed_attention,
)
from tests.helpers import literal_batch

TIGHT = {"rtol": 1e-5, "atol": 1e-5}
GRADS = {"rtol": 1e-5, "atol": 1e-4}


def test_pack_rows_keeps_real_tokens_restarts_positions_and_scores_the_next_answer_token():
    batch = literal_batch()  # rows: chosen 0, chosen 1, rejected 0, rejected 1; width 8
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.labels)
    i = IGNORE_INDEX
    assert packed.input_ids.tolist() == [[1, 40, 41, 42, 50, 51, 2, 1, 43, 44, 52, 2,
                                          1, 40, 41, 42, 60, 61, 62, 2, 1, 43, 44, 63, 64, 65, 66, 2]]  # fmt: skip
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4,
                                             0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]]  # fmt: skip
    # position t scores the row's token t+1 when that one is an answer token; a row's last token scores nothing
    assert packed.targets.tolist() == [i, i, i, 50, 51, 2, i, i, i, 52, 2, i,
                                       i, i, i, 60, 61, 62, 2, i, i, i, 63, 64, 65, 66, 2, i]  # fmt: skip
    assert packed.rows.tolist() == [0] * 7 + [1] * 5 + [2] * 8 + [3] * 8
    assert packed.num_rows == 4 and packed.offsets.tolist() == [0, 7, 12, 20, 28] and packed.max_length == 8


def test_a_full_width_row_and_left_padding_pack_the_same_tokens():
    pairs = [TokenizedPair([1, 40], [50, 51, 2], [60, 2], 0)]
    right = collate_pairs(pairs, pad_id=3)  # width 5: the chosen row is full, nothing after its last token
    packed = pack_rows(right.input_ids, right.attention_mask, right.labels)
    assert packed.targets.tolist() == [IGNORE_INDEX, 50, 51, 2, IGNORE_INDEX, IGNORE_INDEX, 60, 2, IGNORE_INDEX]
    i = IGNORE_INDEX
    left_ids = torch.tensor([[1, 40, 50, 51, 2], [3, 1, 40, 60, 2]])  # the rejected row padded on the left
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    left_labels = torch.tensor([[i, i, 50, 51, 2], [i, i, i, 60, 2]])
    packed_left = pack_rows(left_ids, left_mask, left_labels)
    for name in ("input_ids", "position_ids", "targets", "rows"):
        assert torch.equal(getattr(packed_left, name), getattr(packed, name)), name


def test_sum_per_row_sums_and_means_over_scored_tokens():
    batch = literal_batch()
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.labels)
    values = torch.arange(packed.targets.numel(), dtype=torch.float32) * (packed.targets != IGNORE_INDEX)
    # scored positions: row 0 -> 3, 4, 5; row 1 -> 9, 10; row 2 -> 15..18; row 3 -> 22..26
    assert sum_per_row(values, packed, average=False).tolist() == [12.0, 19.0, 66.0, 120.0]
    assert sum_per_row(values, packed, average=True).tolist() == [4.0, 9.5, 16.5, 24.0]


def test_pack_shared_prompts_packs_each_pairs_prefix_once_and_scores_every_answer_token():
    batch = literal_batch()  # pair 0: prompt [1 40 41 42], answers [50 51 2] / [60 61 62 2]; pair 1: [1 43 44] ...
    packed = pack_shared_prompts(batch.input_ids, batch.attention_mask, batch.labels)
    assert packed.input_ids.tolist() == [[1, 40, 41, 42, 50, 51, 2, 60, 61, 62, 2,
                                          1, 43, 44, 52, 2, 63, 64, 65, 66, 2]]  # fmt: skip
    # the second answer's positions continue from the prompt's end, as in its own padded row
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 0, 1, 2, 3, 4, 3, 4, 5, 6, 7]]
    assert packed.bounds.tolist() == [[0, 4, 7, 11], [11, 14, 16, 21]]
    # each answer's first token is scored from its prompt's last token (3, 13), shared by both answers
    assert packed.scored.tolist() == [3, 4, 5, 13, 14, 3, 7, 8, 9, 13, 16, 17, 18, 19]
    assert packed.targets.tolist() == [50, 51, 2, 52, 2, 60, 61, 62, 2, 63, 64, 65, 66, 2]
    assert packed.rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    assert packed.num_rows == 4


def test_pack_shared_prompts_refuses_an_odd_batch():
    batch = literal_batch()
    with pytest.raises(ValueError, match="even number of rows, got 3"):
        pack_shared_prompts(batch.input_ids[:3], batch.attention_mask[:3], batch.labels[:3])


# ---- one tiny 4-bit policy with LoRA: packed forwards against padded ones ---------------------------------------


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    model = add_lora(load_base("tiny", load_in_4bit=True), gradient_checkpointing=True)
    generator = torch.Generator().manual_seed(1)
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:  # nonzero, so that the adapters change the outputs
            torch.nn.init.normal_(param, std=0.05, generator=generator)
    return model


def decoder_hidden(policy, **inputs):
    return policy.get_base_model().get_decoder()(**inputs, use_cache=False).last_hidden_state


@pytest.mark.parametrize("attention", ["packed_sdpa", "transformers' block mask"])
def test_no_token_attends_across_a_sequence_boundary(policy, attention):
    batch = literal_batch()
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.labels)
    if attention == "packed_sdpa":
        use_packed_attention(policy)
        assert policy.get_base_model().config._attn_implementation == PACKED_ATTENTION
        inputs = packed.attention_kwargs()  # the offsets: each sequence attended on its own
    else:
        inputs = {"position_ids": packed.position_ids}  # transformers reads the boundaries from the positions
    with torch.no_grad():
        hidden = decoder_hidden(policy, input_ids=packed.input_ids, **inputs)[0]  # (N, H)
        changed_ids = packed.input_ids.clone()
        changed_ids[0, 1:7] = torch.tensor([70, 71, 72, 73, 74, 75])  # the first sequence, all but its BOS
        changed = decoder_hidden(policy, input_ids=changed_ids, **inputs)[0]
        alone = [decoder_hidden(policy, input_ids=packed.input_ids[:, packed.rows == r])[0] for r in range(4)]
    later = packed.rows > 0
    assert (hidden[1:7] - changed[1:7]).abs().max() > 1e-3  # the check sees a change where there is one
    torch.testing.assert_close(changed[later], hidden[later], rtol=0, atol=0)  # and none after the boundary
    for r in range(4):  # each sequence as if it were alone in the batch
        torch.testing.assert_close(hidden[packed.rows == r], alone[r], **TIGHT)


def padded_logps(policy, batch, head, average):
    labels = batch.labels[:, 1:]
    if head is None:
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return sequence_logps(logits[:, :-1], labels, average=average)
    hidden = decoder_hidden(policy, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return sequence_logps_from_hidden(hidden[:, :-1], head, labels, average=average, chunk_size=5)


def lora_grads(policy, logps):
    policy.zero_grad()
    (logps * torch.tensor([0.3, -1.2, 0.7, 2.0])).sum().backward()  # any per-sequence gradient, as a loss sends
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def prefix_batches():
    """Pairs whose shared prefix is the prompt, runs into the answers, or is a whole row; and left padding."""
    plain = literal_batch()
    into_answers = collate_pairs([TokenizedPair([1, 40, 41], [50, 51, 52, 2], [50, 51, 60, 2], 0),
                                  TokenizedPair([1, 43], [52, 2, 64], [52, 2], 1)], pad_id=3)  # fmt: skip
    left = literal_batch()
    order = torch.sort(left.attention_mask, dim=1, stable=True).indices  # padding first
    left = type(left)(*(t.gather(1, order) if t.dim() == 2 else t for t in left))
    return {"prompt": plain, "into answers, whole row": into_answers, "left padding": left}


@pytest.mark.parametrize("case", list(prefix_batches()))
def test_shared_prompt_states_are_each_rows_own(policy, case):
    """Every token of a pair packed once has the final state it has in its own padded row: it sees the same tokens
    at the same positions, and the second answer never sees the first."""
    batch = prefix_batches()[case]
    packed = pack_shared_prompts(batch.input_ids, batch.attention_mask, batch.labels)
    use_packed_attention(policy)
    with torch.no_grad():
        hidden = decoder_hidden(policy, input_ids=packed.input_ids, **packed.attention_kwargs())[0]  # (N, H)
        padded = decoder_hidden(policy, input_ids=batch.input_ids, attention_mask=batch.attention_mask)  # (R, T, H)
    real = batch.attention_mask.bool()
    for row in range(packed.num_rows):
        scored = packed.scored[packed.rows == row]  # packed tokens that score this row's answer tokens
        own = padded[row][real[row]]  # (L, H) the row's real tokens, in order
        at = batch.labels[row][real[row]][1:] != IGNORE_INDEX  # which of those score an answer token
        torch.testing.assert_close(hidden[scored], own[:-1][at], **TIGHT)


PACKINGS = [(pack_rows, "prompt")] + [(pack_shared_prompts, case) for case in prefix_batches()]


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize(("pack", "case"), PACKINGS, ids=[f"{p.__name__}-{c}" for p, c in PACKINGS])
def test_logps_and_lora_gradients_equal_the_padded_forwards(policy, lean, average, pack, case):
    batch = prefix_batches()[case]
    head = policy.get_base_model().get_output_embeddings().weight if lean else None
    padded = padded_logps(policy, batch, head, average)
    padded_grads = lora_grads(policy, padded)
    packed = packed_sequence_logps(policy, pack(batch.input_ids, batch.attention_mask, batch.labels),
                                   head_weight=head, average=average, chunk_size=5)  # fmt: skip
    packed_grads = lora_grads(policy, packed)
    torch.testing.assert_close(packed, padded, **TIGHT)
    assert padded_grads.keys() == packed_grads.keys() and len(packed_grads) > 0
    for name, grad in packed_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, padded_grads[name], **GRADS, msg=name)


@pytest.mark.parametrize("pack", [pack_rows, pack_shared_prompts])
def test_a_packed_forward_builds_no_mask_and_a_padded_one_still_does(policy, pack, monkeypatch):
    built = []
    monkeypatch.setattr(
        packing, "sdpa_mask", lambda *args, **kwargs: built.append(kwargs) or sdpa_mask(*args, **kwargs)
    )
    batch = prefix_batches()["prompt"]
    packed_sequence_logps(policy, pack(batch.input_ids, batch.attention_mask, batch.labels), head_weight=None,
                          average=False)  # fmt: skip
    assert built == []  # the attention reads the bounds: the (N, N) mask would be wasted work
    assert policy.get_base_model().config._attn_implementation == PACKED_ATTENTION
    padded_logps(policy, batch, None, average=False)  # the same attention, no bounds: it needs its padding mask
    assert len(built) == 1 and built[0]["attention_mask"] is not None


def test_shared_prompt_refuses_an_attention_that_would_not_read_the_bounds():
    torch.manual_seed(0)
    model = add_lora(load_base("tiny", load_in_4bit=True), gradient_checkpointing=False)
    model.get_base_model().set_attn_implementation("eager")
    batch = literal_batch()
    with pytest.raises(ConfigError, match="--model.shared_prompt needs the model's attention on sdpa, not eager"):
        packed_sequence_logps(model, pack_shared_prompts(batch.input_ids, batch.attention_mask, batch.labels),
                              head_weight=None, average=False)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("DPO", {"shared_prompt": True, "padding_free": False}, "--model.shared_prompt needs --model.padding_free"),
        ("KTO", {"shared_prompt": True, "padding_free": True}, "--model.shared_prompt: KTO does not train on pairs"),
    ],
)
def test_shared_prompt_settings_that_cannot_work_are_one_line(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        getattr(alignment, name)(**kwargs)


# ---- every method's module: --model.padding_free true (and shared_prompt) against false -------------------------

PACKED_METHODS = [name for name in METHODS if getattr(alignment, name).data_kind != "sequences"]  # SFT: padded only
PAIR_METHODS = [name for name in PACKED_METHODS if getattr(alignment, name).data_kind == "pairs"]
METHOD_CASES = [(name, {}) for name in PACKED_METHODS] + [
    ("DPO", {"loss_type": "ipo"}), ("DPO", {"loss_type": "hinge"}), ("ORPO", {"lean_logps": False})
] + [(name, {"shared_prompt": True}) for name in PAIR_METHODS]  # fmt: skip


def seeded_module(name: str, **kwargs):
    """A method's module on the tiny 4-bit base, LoRA B made nonzero so that policy and reference differ."""
    cls = getattr(alignment, name)
    if "reference_cache" in inspect.signature(cls.__init__).parameters:
        kwargs = {"reference_cache": False, **kwargs}  # the reference forward runs in the step, packed as well
    torch.manual_seed(0)
    module = cls(gradient_checkpointing=True, **kwargs)
    module.configure_model()
    generator = torch.Generator().manual_seed(1)
    for param_name, param in sorted(module.policy.named_parameters()):
        if "lora_B" in param_name:
            torch.nn.init.normal_(param, std=0.05, generator=generator)
    return module


def batch_of(name: str):
    """Two literal examples as the method's batches hold them: pairs, or KTO's labelled rows with KL rows."""
    if getattr(alignment, name).data_kind == "pairs":
        return literal_batch()
    rows = [TokenizedUnpaired([1, 40, 41, 42], [50, 51, 2], [60, 61, 62, 2], 0, True),
            TokenizedUnpaired([1, 43, 44], [60, 61, 62, 2], [50, 51, 2], 1, False)]  # fmt: skip
    return collate_unpaired(rows, pad_id=3, pad_to_multiple_of=8)


def test_sft_refuses_padding_free_in_one_line():
    with pytest.raises(ConfigError, match="--model.padding_free true: SFT trains on padded rows only"):
        alignment.SFT(padding_free=True)


@pytest.mark.parametrize(("name", "kwargs"), METHOD_CASES, ids=[f"{n}-{k}" for n, k in METHOD_CASES])
@pytest.mark.slow
def test_module_losses_metrics_and_lora_gradients_equal_the_padded_ones(name, kwargs):
    results = []
    for padding_free in (False, True):
        # padding_free alone shares no prompt (left out, shared_prompt is on wherever padding_free is)
        settings = {"shared_prompt": False, **kwargs} if padding_free else {k: v for k, v in kwargs.items()
                                                                             if k != "shared_prompt"}  # fmt: skip
        module = seeded_module(name, padding_free=padding_free, **settings)
        loss, metrics = module.compute_loss(batch_of(name))
        loss.backward()
        grads = {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}
        results.append((loss, metrics, grads))
    (padded_loss, padded_metrics, padded_grads), (packed_loss, packed_metrics, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, **TIGHT)
    assert packed_metrics.keys() == padded_metrics.keys()
    for metric in padded_metrics:
        torch.testing.assert_close(packed_metrics[metric], padded_metrics[metric], **TIGHT, msg=metric)
    assert packed_grads.keys() == padded_grads.keys()
    for param_name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, param_name
        torch.testing.assert_close(packed_grads[param_name], grad, **GRADS, msg=param_name)
