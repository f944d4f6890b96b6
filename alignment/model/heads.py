"""When log-probs may come from the final hidden states and the LM head's weight (the lean path).

The lean path (`alignment.logprobs.sequence_logps_from_hidden`) computes log softmax(h W^T) from the decoder's
last hidden state h and the head's weight W. That equals the model's own log-probs only when the model's logits
are exactly `lm_head(h)`. Many architectures do more: Gemma 2/3 soft-cap the logits, Cohere multiplies them by
`logit_scale`, Granite divides them by `logits_scaling`, Falcon-H1 multiplies them by `lm_head_multiplier`,
MiniCPM3 scales h before the head. Nothing in the config says so reliably, so the decision is made in two
steps, both of which must pass:

1. the architecture (`config.model_type`) is on a list of those whose causal-LM forward was read and found to
   be `logits = self.lm_head(outputs.last_hidden_state)` (transformers 5.23), and the head is a frozen
   `nn.Linear` without bias;
2. on the first batch, both paths run on a few rows, without dropout and without gradients, and must agree
   (`lean_disagreement`); if they do not, the plain path is used for the rest of the run.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from alignment.logprobs import sequence_logps, sequence_logps_from_hidden

# Read in transformers 5.23, models/<type>/modeling_<type>.py, class <Type>ForCausalLM.forward: logits are
# `self.lm_head(hidden_states)` on the decoder's last hidden state, with nothing before or after.
# (gemma scales the input embeddings, not the logits; gemma2/gemma3 soft-cap the logits: not listed.)
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3",
     "starcoder2"}
)  # fmt: skip

# Mean absolute difference per answer token, in nats, allowed between the two paths on the check rows. Both
# paths round the logits to the matmul's dtype the same way and differ only in the order of sums: far below
# these. A scaled or capped head (logits / 8, tanh capping) differs by far more on a trained model.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
CHECK_ROWS = 2  # rows of the first batch the check runs on: small, so the full logits it builds stay small


def plain_head_weight(model: PreTrainedModel) -> tuple[Tensor | None, str]:
    """(the head's weight (V, H), "") when `model`'s logits are `lm_head(last hidden state)`, else (None, why)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None, f"{model_type!r} is not among the architectures known to have a plain LM head"
    head = model.get_output_embeddings()
    kind = type(head).__bases__[-1] if type(head).__name__.startswith("FSDP") else type(head)  # FSDP2's subclass
    if kind is not torch.nn.Linear or head.bias is not None:
        return None, f"its LM head is a {type(head).__name__}{' with a bias' if head.bias is not None else ''}"
    if head.weight.requires_grad:
        return None, "its LM head is trained"
    return head.weight, ""


def lean_disagreement(model: PreTrainedModel, weight: Tensor, input_ids: Tensor, attention_mask: Tensor,
                      labels: Tensor, *, ignore_index: int = -100) -> str | None:  # fmt: skip
    """None when the lean and plain paths give the same log-probs on the first rows of a batch, else why not.

    input_ids, attention_mask (N, T); labels (N, T-1) aligned with the logits at positions 0..T-2. Runs with
    every module in eval mode (no dropout, so both paths see the same network) and without gradients, under
    the caller's autocast; the modules' modes are restored after.
    """
    rows = slice(0, CHECK_ROWS)
    input_ids, attention_mask, labels = input_ids[rows], attention_mask[rows], labels[rows]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
            plain = sequence_logps(logits[:, :-1], labels, ignore_index=ignore_index)  # (N,)
            del logits
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            lean = sequence_logps_from_hidden(
                hidden.last_hidden_state[:, :-1], weight, labels, ignore_index=ignore_index
            )  # (N,)
    finally:
        for module, training in modes.items():
            module.training = training
    tokens = (labels != ignore_index).sum().clamp(min=1)
    per_token = ((lean - plain).abs().sum() / tokens).item()
    if per_token <= TOLERANCE.get(matmul_dtype(weight), TOLERANCE[torch.bfloat16]):
        return None
    return f"the lean and plain log-probs differ by {per_token:.3g} nats per answer token"


def matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on for the weight's device, else the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
