"""SFT: supervised fine-tuning on answers, the step before DPO or KTO."""

from __future__ import annotations

import torch
from torch import Tensor

from alignment.data import IGNORE_INDEX, SequenceBatch
from alignment.logprobs import sequence_logps, sequence_logps_from_hidden
from alignment.methods.base import PreferenceModule, Split


class SFT(PreferenceModule):
    """Supervised fine-tuning: the mean negative log-likelihood per answer token, NLL = -sum_t log p(y_t | x, y_<t) /
    (tokens in the batch), as TRL's SFTTrainer computes its loss.

    Trains on the chosen answers of preference pairs, on `{prompt, completion}` rows (those labelled false are left
    out) or on chat conversations `{messages: [...]}`, where the last assistant turn is trained and the turns
    before it are the prompt. Logged: `loss` (that NLL, each answer token weighing the same) and
    `mean_token_accuracy` (share of answer tokens that are the model's top-1 prediction), as TRL names them.
    No reference model; `beta` is not used.

    Args:
        completion_only_loss: train on the answer tokens only (TRL's default for prompt-completion data); false:
            on the prompt's tokens too (all but the first token of each row).
    """

    data_kind = "sequences"
    metric_names = ["loss", "mean_token_accuracy"]
    progress_metric = "mean_token_accuracy"

    def __init__(self, *args, completion_only_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)  # the base's save_hyperparameters() records this too

    def padding_free_problem(self) -> str | None:
        return "SFT trains on padded rows only, for now"

    def compute_loss(self, batch: SequenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch.labels
        if not self.hparams.completion_only_loss:
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
        targets = labels[:, 1:]  # (B, T-1): position t scores token t+1
        mask = targets != IGNORE_INDEX  # (B, T-1)
        head = self._lean_head_weight(batch.input_ids, batch.attention_mask, labels)
        if head is None:
            logits = self(batch.input_ids, batch.attention_mask)[:, :-1]  # (B, T-1, V)
            logps = sequence_logps(logits, targets, ignore_index=IGNORE_INDEX)  # (B,) sums
            top1 = logits.detach()[mask].argmax(-1)  # (N,)
        else:
            hidden = self.hidden_states(batch.input_ids, batch.attention_mask)[:, :-1]  # (B, T-1, H)
            logps = sequence_logps_from_hidden(
                hidden, head, targets, ignore_index=IGNORE_INDEX, chunk_size=self.hparams.logits_chunk_size
            )
            top1 = _top1(hidden.detach()[mask], head, self.hparams.logits_chunk_size)
        tokens = mask.sum(-1)  # (B,)
        loss = -logps.sum() / tokens.sum().clamp(min=1)
        nll = (-logps.detach() / tokens.clamp(min=1)).float()  # (B,) per row
        metrics = {
            "loss": nll.repeat_interleave(tokens),  # (N,): the mean over answer tokens, whatever the rows' lengths
            "mean_token_accuracy": (top1 == targets[mask]).float(),  # (N,)
        }
        return loss, metrics


@torch.no_grad()
def _top1(hidden: Tensor, head: Tensor, chunk_size: int | None) -> Tensor:
    """argmax_v (h_i W^T)_v for N positions (hidden (N, H), head W (V, H)), a chunk of logits at a time."""
    chunk = chunk_size or max(1, 2**25 // head.shape[0])
    weight = head.to(hidden.dtype)
    return torch.cat([(h @ weight.T).argmax(-1) for h in hidden.split(chunk)])  # (N,)
