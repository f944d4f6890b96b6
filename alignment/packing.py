"""Padding-free forwards: the rows of a padded batch packed into one row, each sequence attending only to itself.

A padded (2B, T) batch spends compute on every padding position; packed, the forward sees only the N real tokens.
Position ids restart at 0 at each sequence's first token, no attention mask is passed, and the sequences' offsets
go to the attention layers as `cu_seq_lens_q` / `cu_seq_lens_k` (flash-attention's varlen arguments). On the
default `sdpa` implementation, the model is switched to `packed_sdpa` (registered here): given the offsets, it runs
causal attention over each sequence on its own, so no token attends across a boundary and no work goes to the
(N, N) block-diagonal mask transformers would otherwise build from the position ids; without them it is `sdpa`.
The scored positions are those of the padded batch, so the log-probs are the same up to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignment.logprobs import sequence_logps, sequence_logps_from_hidden

IGNORE_INDEX = -100
PACKED_ATTENTION = "packed_sdpa"  # the attention implementation registered below


def packed_sdpa_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs
                          ) -> tuple[Tensor, None]:  # fmt: skip
    """transformers' attention-function interface: query (1, heads, N, d), key and value (1, kv_heads, N, d).

    With `cu_seq_lens_q` (the packed sequences' offsets, (S+1,)) each sequence attends causally to itself alone;
    without it, transformers' `sdpa` (padded batches, generation)."""
    offsets = kwargs.get("cu_seq_lens_q")
    if offsets is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # (1, heads, N, d)
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


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches: sdpa's own mask


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a model on transformers' `sdpa` to `packed_sdpa` (the same attention unless given offsets)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # private API, checked on transformers 5.23: no public getter of the attention a model runs (its docs read this)
    if base.config._attn_implementation == "sdpa":
        base.set_attn_implementation(PACKED_ATTENTION)


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


def sum_per_row(token_logps: Tensor, packed: PackedRows, *, average: bool, ignore_index: int = IGNORE_INDEX
                ) -> Tensor:  # fmt: skip
    """(R,) sums (or means over scored tokens, as `sequence_logps` divides) of per-token values (N,) by row."""
    total = token_logps.new_zeros(packed.num_rows).index_add_(0, packed.rows, token_logps)  # (R,)
    if not average:
        return total
    scored = (packed.targets != ignore_index).to(token_logps.dtype)  # (N,)
    counts = token_logps.new_zeros(packed.num_rows).index_add_(0, packed.rows, scored)  # (R,)
    return total / counts.clamp(min=1)


def packed_sequence_logps(
    model: torch.nn.Module,
    packed: PackedRows,
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
    targets = packed.targets.unsqueeze(1)  # (N, 1): each token its own one-token "sequence", so (N,) values return
    use_packed_attention(model)
    if head_weight is None:
        logits = model(input_ids=packed.input_ids, use_cache=False, **packed.attention_kwargs()).logits
        token_logps = sequence_logps(logits[0].unsqueeze(1), targets, ignore_index=ignore_index)  # (N,)
    else:
        decoder = _decoder(model)
        hidden = decoder(input_ids=packed.input_ids, use_cache=False, **packed.attention_kwargs())
        token_logps = sequence_logps_from_hidden(
            hidden.last_hidden_state[0].unsqueeze(1), head_weight, targets, ignore_index=ignore_index,
            chunk_size=chunk_size,
        )  # fmt: skip
    return sum_per_row(token_logps, packed, average=average, ignore_index=ignore_index)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (LoRA layers, when present, live inside it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()
