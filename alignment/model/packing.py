"""Padding-free forwards: the rows of a padded batch packed into one row, each sequence attending only to itself.

A padded (2B, T) batch spends compute on every padding position; packed, the forward sees only the N real tokens.
Position ids restart at 0 at each sequence's first token, no attention mask is passed, and the sequences' offsets
go to the attention layers as `cu_seq_lens_q` / `cu_seq_lens_k` (flash-attention's varlen arguments). On the
default `sdpa` implementation, the model is switched to `packed_sdpa` (registered here): given the offsets, it runs
causal attention over each sequence on its own, so no token attends across a boundary and no work goes to the
(N, N) block-diagonal mask transformers would otherwise build from the position ids; without them it is `sdpa`.
The scored positions are those of the padded batch, so the log-probs are the same up to float rounding.

`pack_shared_prompts` goes further for pairs: a pair's two rows begin with the same prompt, so it is packed once,
its first answer after it and its second answer after that, the second answer's positions continuing from the
prompt's end and its tokens attending to the prompt and to themselves only (`packed_sdpa` given the pairs' bounds).
Each token then has the same inputs, positions and visible keys as in its own padded row, so the states and the
log-probs are again the same up to float rounding, with the prompt's tokens computed once instead of twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignment.errors import ConfigError
from alignment.logprobs import IGNORE_INDEX, sequence_logps, sequence_logps_from_hidden

PACKED_ATTENTION = "packed_sdpa"  # the attention implementation registered below
PAIR_BOUNDS = "shared_prompt_bounds"  # the keyword that brings a SharedPromptRows' bounds to the attention layers


def packed_sdpa_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs
                          ) -> tuple[Tensor, None]:  # fmt: skip
    """transformers' attention-function interface: query (1, heads, N, d), key and value (1, kv_heads, N, d).

    With `cu_seq_lens_q` (the packed sequences' offsets, (S+1,)) each sequence attends causally to itself alone;
    with `shared_prompt_bounds` (SharedPromptRows) each pair's answers attend to their prompt and to themselves;
    with neither, transformers' `sdpa` (padded batches, generation)."""
    offsets, pair_bounds = kwargs.get("cu_seq_lens_q"), kwargs.pop(PAIR_BOUNDS, None)
    if offsets is None and pair_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # (1, heads, N, d)
    if pair_bounds is not None:
        return _shared_prompt_attention(query, key, value, pair_bounds, dropout, scaling), None
    bounds = offsets.tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
        )  # fmt: skip
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, heads, d)


def _shared_prompt_attention(query: Tensor, key: Tensor, value: Tensor, bounds: Tensor, dropout: float,
                             scaling: float | None) -> Tensor:  # fmt: skip
    """Attention over pairs packed as prompt, first answer, second answer (query, key, value (1, heads, N, d),
    bounds (S, 4)): the prompt and first answer causal over themselves; the second answer over the prompt, then
    causally over itself. Returns (1, N, heads, d)."""
    outputs = []
    for start, prompt_end, first_end, second_end in bounds.tolist():
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:first_end], key[:, :, start:first_end], value[:, :, start:first_end],
            dropout_p=dropout, scale=scaling, is_causal=True,
        ))  # fmt: skip
        if second_end == first_end:  # the second row is all prefix: nothing of its own
            continue
        own, shared = second_end - first_end, prompt_end - start
        visible = torch.ones(own, shared + own, dtype=torch.bool, device=query.device).tril_(shared)  # (own, keys)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, first_end:second_end],
            torch.cat([key[:, :, start:prompt_end], key[:, :, first_end:second_end]], dim=2),
            torch.cat([value[:, :, start:prompt_end], value[:, :, first_end:second_end]], dim=2),
            attn_mask=visible, dropout_p=dropout, scale=scaling,
        ))  # fmt: skip
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


_in_packed_forward = ContextVar("in_packed_forward", default=False)


def packed_sdpa_mask(*args, **kwargs) -> Tensor | None:
    """transformers' mask interface: sdpa's own mask, except inside `packed_sequence_logps`'s forward. There the
    attention reads the sequences' bounds, and the (N, N) block-diagonal mask transformers would build from the
    restarting position ids (as many entries as the packed row's tokens squared) is never read: none is built."""
    return None if _in_packed_forward.get() else sdpa_mask(*args, **kwargs)


@contextmanager
def _packed_forward():
    token = _in_packed_forward.set(True)
    try:
        yield
    finally:
        _in_packed_forward.reset(token)


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a model on transformers' `sdpa` to `packed_sdpa` (the same attention unless given offsets)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _attention(base) == "sdpa":
        base.set_attn_implementation(PACKED_ATTENTION)


def packed_attention_problem(model: torch.nn.Module) -> str | None:
    """Why the model's attention would not read a SharedPromptRows' bounds (None: it is sdpa, or packed_sdpa)."""
    attention = _attention(model)
    return None if attention in ("sdpa", PACKED_ATTENTION) else f"the model's attention is {attention}, not sdpa"


def _attention(model: torch.nn.Module) -> str:
    """The attention implementation a model runs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # private API, checked on transformers 5.23: no public getter of the attention a model runs (its docs read this)
    return base.config._attn_implementation


class PackedRows(NamedTuple):
    input_ids: Tensor  # (1, N) the real tokens of every row, row after row
    position_ids: Tensor  # (1, N) 0, 1, ... restarting at each row's first token
    targets: Tensor  # (N,) the next token of the same row where that one is scored (an answer token), else ignored
    rows: Tensor  # (N,) the row each token comes from
    num_rows: int
    offsets: Tensor  # (R+1,) int32: row r is tokens offsets[r]:offsets[r+1]
    max_length: int  # tokens of the longest row

    def attention_kwargs(self) -> dict:
        """The sequences' bounds as flash-attention's varlen arguments (read by `packed_sdpa` too)."""
        return {"position_ids": self.position_ids, "cu_seq_lens_q": self.offsets, "cu_seq_lens_k": self.offsets,
                "max_length_q": self.max_length, "max_length_k": self.max_length}  # fmt: skip


def pack_rows(input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX
              ) -> PackedRows:  # fmt: skip
    """Pack the real tokens (attention_mask 1) of a (R, T) batch into one row of N tokens.

    `labels` are the batch's input-aligned labels (ignore_index on prompt and padding); a causal LM's position t
    scores the row's token t+1, so `targets[t]` is the row's label at t+1, and ignore_index at each row's last real
    token, which scores nothing. Each row's real tokens must be contiguous (right or left padding).
    """
    real = attention_mask.bool()  # (R, T)
    num_rows = real.shape[0]
    next_labels = torch.cat([labels[:, 1:], labels.new_full((num_rows, 1), ignore_index)], dim=1)  # (R, T)
    next_labels = next_labels.masked_fill(~torch.cat([real[:, 1:], real.new_zeros(num_rows, 1)], dim=1), ignore_index)
    positions = real.long().cumsum(1) - 1  # (R, T) 0 at each row's first real token
    rows = torch.arange(num_rows, device=input_ids.device).unsqueeze(1).expand_as(real)  # (R, T)
    lengths = real.sum(1)  # (R,)
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (R+1,)
    return PackedRows(
        input_ids=input_ids[real].unsqueeze(0),
        position_ids=positions[real].unsqueeze(0),
        targets=next_labels[real],
        rows=rows[real],
        num_rows=num_rows,
        offsets=offsets,
        max_length=int(lengths.max()),
    )


class SharedPromptRows(NamedTuple):
    input_ids: Tensor  # (1, N) per pair: the shared prefix, the rest of the first row, the rest of the second row
    position_ids: Tensor  # (1, N) each token's position in its own padded row
    bounds: Tensor  # (S, 4) per pair: start, end of the shared prefix, end of the first row, end of the second row
    scored: Tensor  # (M,) the packed token whose output scores each target
    targets: Tensor  # (M,) the answer tokens scored, row after row
    rows: Tensor  # (M,) the row of the padded batch each target belongs to
    num_rows: int

    def attention_kwargs(self) -> dict:
        """The pairs' bounds, read by `packed_sdpa` (no other attention implementation reads them)."""
        return {"position_ids": self.position_ids, PAIR_BOUNDS: self.bounds}


def pack_shared_prompts(input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                        ignore_index: int = IGNORE_INDEX) -> SharedPromptRows:  # fmt: skip
    """Pack a (2S, T) batch whose rows s and S + s are a pair (chosen rows, then rejected rows, as `collate_pairs`
    makes them) into one row, the tokens the pair's rows begin with (their prompt, at least) once.

    Any common prefix may be shared, not only the prompt: a causal model's state at a prefix token does not depend
    on what follows it, so the second row's tokens there, and the targets they score, read the first row's states.
    Each row's real tokens must be contiguous (right or left padding).
    """
    real = attention_mask.bool()  # (2S, T)
    num_rows, width = real.shape
    if num_rows % 2:
        raise ValueError(f"a batch of pairs has an even number of rows, got {num_rows}")
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices  # each row's real tokens first
    ids, labels, real = input_ids.gather(1, order), labels.gather(1, order), real.gather(1, order)  # left-aligned
    half = num_rows // 2
    lengths = real.sum(1)  # (2S,)
    same = (ids[:half] == ids[half:]) & real[:half] & real[half:]  # (S, T)
    prefix = same.to(torch.int64).cumprod(1).sum(1)  # (S,) tokens the pair's rows share from their start
    first, second = lengths[:half], lengths[half:]
    sizes = first + second - prefix  # (S,) packed tokens of each pair
    starts = sizes.cumsum(0) - sizes  # (S,)
    t = torch.arange(width, device=ids.device).unsqueeze(0)  # (1, T)
    where = torch.cat([
        starts.unsqueeze(1) + t,
        torch.where(t < prefix.unsqueeze(1), starts.unsqueeze(1) + t, (starts + first - prefix).unsqueeze(1) + t),
    ])  # (2S, T): where each row's token t sits in the packed row  # fmt: skip
    own = real & torch.cat([torch.ones_like(real[:half]), t >= prefix.unsqueeze(1)])  # (2S, T) tokens placed
    total = int(sizes.sum())
    packed_ids = ids.new_zeros(total).index_put_((where[own],), ids[own])
    positions = t.new_zeros(total).index_put_((where[own],), t.expand_as(own)[own])
    next_labels = labels[:, 1:].masked_fill(~real[:, 1:], ignore_index)  # (2S, T-1): token t scores token t+1
    hit = next_labels != ignore_index
    row_of = torch.arange(num_rows, device=ids.device).unsqueeze(1).expand_as(hit)
    return SharedPromptRows(
        input_ids=packed_ids.unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        bounds=torch.stack([starts, starts + prefix, starts + first, starts + sizes], dim=1),
        scored=where[:, :-1][hit],
        targets=next_labels[hit],
        rows=row_of[hit],
        num_rows=num_rows,
    )


def sum_per_row(token_logps: Tensor, packed: PackedRows | SharedPromptRows, *, average: bool,
                ignore_index: int = IGNORE_INDEX) -> Tensor:  # fmt: skip
    """(R,) sums (or means over scored tokens, as `sequence_logps` divides) of per-target values by row."""
    total = token_logps.new_zeros(packed.num_rows).index_add_(0, packed.rows, token_logps)  # (R,)
    if not average:
        return total
    scored = (packed.targets != ignore_index).to(token_logps.dtype)  # (N,)
    counts = token_logps.new_zeros(packed.num_rows).index_add_(0, packed.rows, scored)  # (R,)
    return total / counts.clamp(min=1)


def packed_sequence_logps(
    model: torch.nn.Module,
    packed: PackedRows | SharedPromptRows,
    *,
    head_weight: Tensor | None,
    average: bool,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """(R,) log-probs of each row's scored tokens from one forward over the packed row.

    `model` is a causal LM (a PEFT model or a transformers one). With `head_weight` (the LM head's (V, H) weight)
    the decoder's final hidden states go through the lean path, `sequence_logps_from_hidden`, which forms logits
    only at scored positions; without it, the model's full (1, N, V) logits go through `sequence_logps`.
    """
    targets = packed.targets.unsqueeze(1)  # (M, 1): each target its own one-token "sequence", so (M,) values return
    use_packed_attention(model)
    shared = isinstance(packed, SharedPromptRows)
    if shared and _attention(model) != PACKED_ATTENTION:  # any other would read no bounds: answers would mix
        raise ConfigError(f"--model.shared_prompt needs the model's attention on sdpa, not {_attention(model)}")
    if head_weight is None:
        with _packed_forward():
            logits = model(input_ids=packed.input_ids, use_cache=False, **packed.attention_kwargs()).logits[0]
        logits = logits[packed.scored] if shared else logits  # (N or M, V)
        token_logps = sequence_logps(logits.unsqueeze(1), targets, ignore_index=ignore_index)  # (M,)
    else:
        with _packed_forward():
            hidden = _decoder(model)(input_ids=packed.input_ids, use_cache=False, **packed.attention_kwargs())
        hidden = hidden.last_hidden_state[0]  # (N, H)
        hidden = hidden[packed.scored] if shared else hidden
        token_logps = sequence_logps_from_hidden(
            hidden.unsqueeze(1), head_weight, targets, ignore_index=ignore_index, chunk_size=chunk_size,
        )  # fmt: skip
    return sum_per_row(token_logps, packed, average=average, ignore_index=ignore_index)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (LoRA layers, when present, live inside it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()
