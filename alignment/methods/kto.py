"""KTO: alignment from answers labelled desirable or undesirable, no pairs needed; the reference's log-probs come
from the reference scorer, as DPO's."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

from alignment.data import PreferenceDataModule, UnpairedBatch
from alignment.losses.kto import apo_zero_unpaired_loss, kto_kl_estimate, kto_loss, weights_advice
from alignment.methods.base import PreferenceModule, Split, _check
from alignment.methods.reference import ReferenceScorer

log = logging.getLogger(__name__)


class KTO(PreferenceModule):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) against a frozen reference: the base with adapters
    off, or the adapter training started from (`--model.adapter`), frozen.

    Rows are `{prompt, completion, label}` (label true: desirable), or preference pairs, each unpaired into a
    desirable (chosen) and an undesirable (rejected) example. Each example also carries another example's
    completion to its prompt: the mismatched pairs of a batch estimate the KL reference point z_0, averaged over
    processes, clamped at 0 and detached, as in TRL's KTOTrainer. The reference log-probs of the completions and of
    the mismatched pairs come from the reference cache, computed once as DPO's are (`alignment.methods.reference`).

    Logged under TRL's KTO names: `kl` (z_0), `rewards/chosen` and `logps/chosen` (beta * (policy - reference), and
    the policy's log-prob, summed over tokens, of the desirable examples), the same `/rejected` for the undesirable
    ones, `rewards/margins` (mean desirable minus mean undesirable reward, over batches holding both); and, not
    TRL's, `rewards/accuracies`: the share of examples strictly on their label's side of the reference point
    (log-ratio above z_0 for desirable examples, below it for undesirable ones: the loss below half its weight; 0
    at step 0, where every log-ratio is 0).

    Args:
        loss_type: kto (the KTO loss), or apo_zero_unpaired (APO-zero on unpaired answers, D'Oosterlinck et al.
            2024, as TRL's: KTO's loss with the reference point fixed at 0, so no KL estimate: the policy scores no
            mismatched pairs and `kl` logs 0).
        desirable_weight: lambda_D, the weight of the desirable examples' losses; with unequal counts,
            lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] is recommended (the log says so when outside).
        undesirable_weight: lambda_U, the weight of the undesirable examples' losses.
        reference_cache: compute the reference log-probs once before training and keep them on disk, as DPO's.
        reference_cache_dir: where the cache lives, as DPO's.
    """

    data_kind = "unpaired"
    has_reference = True
    metric_names = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected"]  # fmt: skip

    def __init__(
        self,
        *args,
        loss_type: Literal["kto", "apo_zero_unpaired"] = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference_cache: bool = True,
        reference_cache_dir: str | None = None,
        **kwargs,
    ):
        _check(desirable_weight > 0, f"--model.desirable_weight must be > 0, got {desirable_weight}")
        _check(undesirable_weight > 0, f"--model.undesirable_weight must be > 0, got {undesirable_weight}")
        super().__init__(*args, **kwargs)  # the base's save_hyperparameters() records these too
        # its two answer rows per item: the completion and the mismatched KL completion
        self.reference = ReferenceScorer(self, cache=reference_cache, cache_dir=reference_cache_dir)

    def compute_loss(self, batch: UnpairedBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        hp, size = self.hparams, len(batch.index)
        ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
        policy_logps = self.row_logps(ids[:size], mask[:size], labels[:size], average=False)  # (B,) sums
        if hp.loss_type == "apo_zero_unpaired":  # no reference point: the mismatched pairs are not scored
            reference_logps, _ = self.reference.logps(batch, average=False, split=split)
            losses, rewards = apo_zero_unpaired_loss(
                policy_logps, reference_logps, batch.desirable, beta=hp.beta,
                desirable_weight=hp.desirable_weight, undesirable_weight=hp.undesirable_weight,
            )  # fmt: skip
            z_0 = policy_logps.new_zeros(())
            return losses.mean(), kto_metrics(losses, rewards, policy_logps, batch.desirable, z_0, hp.beta)
        with torch.no_grad():  # the KL term is detached: no backward through the mismatched pairs
            policy_kl_logps = self.row_logps(ids[size:], mask[size:], labels[size:], average=False)
        reference_logps, reference_kl_logps = self.reference.logps(batch, average=False, split=split)
        kl = kto_kl_estimate(policy_kl_logps, reference_kl_logps)
        if self.attached and self.trainer.world_size > 1:  # one z_0 for the global batch, as TRL's
            kl = self.trainer.strategy.reduce(kl, reduce_op="mean")
        losses, rewards, z_0 = kto_loss(
            policy_logps, reference_logps, batch.desirable, kl, beta=hp.beta,
            desirable_weight=hp.desirable_weight, undesirable_weight=hp.undesirable_weight,
        )  # fmt: skip
        return losses.mean(), kto_metrics(losses, rewards, policy_logps, batch.desirable, z_0, hp.beta)

    def on_fit_start(self) -> None:
        self.reference.prepare()
        datamodule = self.trainer.datamodule
        train = datamodule.items("train") if isinstance(datamodule, PreferenceDataModule) else None
        if self.trainer.is_global_zero and train is not None:
            desirable = sum(example.desirable for example in train)
            hp = self.hparams
            advice = weights_advice(desirable, len(train) - desirable, hp.desirable_weight, hp.undesirable_weight)
            if desirable in (0, len(train)):  # one label only: the weights have nothing to balance
                advice = one_label_note(len(train), desirable > 0)
            if advice:
                log.warning(advice)

    def on_fit_end(self) -> None:
        self.reference.finish()


def one_label_note(n_examples: int, desirable: bool) -> str:
    """What training on examples of one label does: only that label's loss term applies."""
    label, other = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
    return (
        f"KTO: all {n_examples} training examples are labelled {label} (label {str(desirable).lower()}), none "
        f"{other}: only the {label} examples' loss applies, and --model.desirable_weight / --model.undesirable_weight "
        f"have nothing to balance; add {other} rows for KTO to contrast them"
    )


def kto_metrics(
    losses: Tensor, rewards: Tensor, policy_logps: Tensor, desirable: Tensor, z_0: Tensor, beta: float
) -> dict[str, Tensor]:
    """The logged values: per example, over the examples of one label, or one per batch (kl, margins)."""
    chosen, rejected = rewards[desirable], rewards[~desirable]
    both = len(chosen) > 0 and len(rejected) > 0
    margins = (chosen.mean() - rejected.mean()).reshape(1) if both else rewards.new_zeros(0)
    return {
        "loss": losses.detach(),
        "kl": z_0.reshape(1),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": margins,
        "rewards/accuracies": torch.where(desirable, rewards > beta * z_0, rewards < beta * z_0).float(),
        "logps/chosen": policy_logps.detach()[desirable],
        "logps/rejected": policy_logps.detach()[~desirable],
    }
