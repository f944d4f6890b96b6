"""Padding-free forwards: the rows of a padded batch packed into one row, each sequence attending only to itself.

A padded (2B, T) batch spends compute on every padding position; packed, the forward sees only the N real tokens.
Position ids restart at 0 at each sequence's first token, and no attention mask is passed: transformers then reads
the sequence boundaries from the position ids (`masking_utils.find_packed_sequence_indices`) and builds a
block-diagonal causal mask (or, with flash-attention, the sequences' offsets), so no token attends across a
boundary. The scored positions are those of the padded batch, so the log-probs are the same up to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignment.logprobs import sequence_logps, sequence_logps_from_hidden

IGNORE_INDEX = -100


class PackedRows(NamedTuple):
    input_ids: Tensor  # (1, N) the real tokens of every row, row after row
    position_ids: Tensor  # (1, N) 0, 1, ... restarting at each row's first token
    targets: Tensor  # (N,) the next token of the same row where that one is scored (an answer token), else ignored
    rows: Tensor  # (N,) the row each token comes from
    num_rows: int


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
    return PackedRows(
        input_ids=input_ids[real].unsqueeze(0),
        position_ids=positions[real].unsqueeze(0),
        targets=next_labels[real],
        rows=rows[real],
        num_rows=num_rows,
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
    if head_weight is None:
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        token_logps = sequence_logps(logits[0].unsqueeze(1), targets, ignore_index=ignore_index)  # (N,)
    else:
        decoder = _decoder(model)
        hidden = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
        token_logps = sequence_logps_from_hidden(
            hidden.last_hidden_state[0].unsqueeze(1), head_weight, targets, ignore_index=ignore_index,
            chunk_size=chunk_size,
        )  # fmt: skip
    return sum_per_row(token_logps, packed, average=average, ignore_index=ignore_index)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (LoRA layers, when present, live inside it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()
