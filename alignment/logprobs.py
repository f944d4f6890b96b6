"""Per-sequence log-probabilities of label tokens under a causal LM."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label of a position that is not scored: prompt, padding (as transformers' loss)


def sequence_logps(
    logits: Tensor, labels: Tensor, *, average: bool = False, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Sum (or mean) over tokens of log p(labels[:, t] | logits[:, t]).

    logits (B, T, V) and labels (B, T) are ALIGNED: logits[:, t] scores labels[:, t]; the caller
    shifts a causal LM's output (logits[:, :-1] against input labels[:, 1:]). Positions whose
    label is ``ignore_index`` contribute nothing. Computes in float32, or in the logits' dtype when that is wider
    (float64 logits: float64 math), and returns (B,) in that dtype.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are not aligned")
    mask = labels != ignore_index  # (B, T)
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T)
    logits = logits.to(logps_dtype(logits.dtype))
    # log_softmax(x)[y] = x[y] - logsumexp(x): never materialises a second (B, T, V) tensor of logps
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask  # (B, T)
    total = token_logps.sum(-1)  # (B,)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


# ---- the memory-lean path: from final hidden states, never a (B, T, V) tensor ---------------------------------

LOGITS_PER_CHUNK = 2**25  # ~128 MiB of fp32 logits alive at once when no chunk size is given


def sequence_logps_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:
    """`sequence_logps(hidden @ weight.T, labels)` without the (B, T, V) logits.

    hidden (B, T, H) and labels (B, T) are ALIGNED as in `sequence_logps`; weight (V, H) is the output
    projection (an LM head without bias). Only positions with a real label get logits, `chunk_size` of them at
    a time (default: about 2**25 logits per chunk), each chunk log-softmaxed in float32, or in the matmul's dtype
    when that is wider. Returns (B,) in the dtype `sequence_logps` returns for the logits the matmul would give.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} are not aligned")
    mask = labels != ignore_index  # (B, T)
    rows = mask.nonzero()[:, 0]  # (N,) the sequence of each label position
    chunk = chunk_size or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("the lean log-prob path does not train the LM head; use the plain path")
    want_grad = hidden.requires_grad and torch.is_grad_enabled()
    dtype = _matmul_dtype(hidden, weight)
    token_logps = _ChunkedTokenLogps.apply(hidden[mask], weight, labels[mask], chunk, dtype, want_grad)  # (N,)
    total = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device).index_add_(0, rows, token_logps)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def logps_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log-probs are computed and returned in: float32, never below the input's precision."""
    return torch.promote_types(dtype, torch.float32)


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the LM head's matmul would run in: autocast's when it is on (as in the plain forward)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h_i W^T)[y_i] for N positions, chunk by chunk; the gradient w.r.t. h is formed in forward.

    d/dh_i log softmax(h_i W^T)[y_i] = W[y_i] - softmax(h_i W^T) W: each chunk's logits exist once, in forward,
    and backward only scales these (N, H) rows by the incoming per-token gradient, with no recomputation.
    The head's weight is frozen here (LoRA never trains it), so no gradient w.r.t. W is formed.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, dtype: torch.dtype, want_grad: bool
    ) -> Tensor:
        # hidden (N, H), weight (V, H), targets (N,); want_grad: whether backward will run (not under no_grad)
        logps = torch.empty(hidden.shape[0], dtype=logps_dtype(dtype), device=hidden.device)  # (N,)
        d_hidden = torch.empty_like(hidden, dtype=dtype) if want_grad else None  # (N, H)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, H)
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]  # (c, H), (c,)
                logits = (h @ w.T).to(logps.dtype)  # (c, V)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (c, 1)
                logps[start : start + chunk] = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
                if want_grad:
                    probs = logits.sub_(lse).exp_().to(dtype)  # (c, V) softmax, in place of the logits
                    d_hidden[start : start + chunk] = w[y] - probs @ w  # (c, H)
        ctx.save_for_backward(d_hidden)
        ctx.hidden_dtype = hidden.dtype
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: Tensor):
        (d_hidden,) = ctx.saved_tensors  # (N, H)
        grad_hidden = (grad_logps.unsqueeze(-1) * d_hidden).to(ctx.hidden_dtype)  # (N, H)
        return grad_hidden, None, None, None, None, None
