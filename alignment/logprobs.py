"""Per-sequence log-probabilities of label tokens under a causal LM."""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_logps(logits: Tensor, labels: Tensor, *, average: bool = False, ignore_index: int = -100) -> Tensor:
    """Sum (or mean) over tokens of log p(labels[:, t] | logits[:, t]).

    logits (B, T, V) and labels (B, T) are ALIGNED: logits[:, t] scores labels[:, t]; the caller
    shifts a causal LM's output (logits[:, :-1] against input labels[:, 1:]). Positions whose
    label is ``ignore_index`` contribute nothing. Returns (B,) in float32.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are not aligned")
    mask = labels != ignore_index  # (B, T)
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T)
    logits = logits.float()
    # log_softmax(x)[y] = x[y] - logsumexp(x): never materialises a second (B, T, V) tensor of logps
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask  # (B, T)
    total = token_logps.sum(-1)  # (B,)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total
