"""DPO: preference optimization against a frozen reference, whose log-probs come from a cache; or, TR-DPO, against
a reference that moves toward the policy during training."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from alignment.data import PreferenceBatch
from alignment.errors import ConfigError
from alignment.logprobs import IGNORE_INDEX, logps_dtype
from alignment.losses import (
    DPOLossType,
    FDivergenceType,
    LossKnobs,
    PairLogps,
    RunningMean,
    chosen_nll,
    dpo_loss_terms,
    label_smoothing_problem,
    ld_token_weights,
    loss_types_problem,
    rpo_loss,
    wpo_pair_weights,
)
from alignment.methods.base import REWARD_METRICS, PreferenceModule, Split, _check, answer_tokens, reward_metrics
from alignment.methods.reference import ReferenceScorer, add_moving_reference, reference_pairs, sync_reference

log = logging.getLogger(__name__)


class DPO(PreferenceModule):
    """Direct Preference Optimization (Rafailov et al. 2023); the reference is the base with adapters off, or the
    adapter training started from (`adapter`), frozen.

    Logged as TRL's DPOTrainer logs, for every loss_type: `logps/*` the policy's log-probs summed over tokens,
    `rewards/*` beta * (policy - reference) of those sums. IPO's loss alone takes per-token means (as TRL's), so its
    logged accuracies and margins are not the loss's: a short chosen answer can win on means and lose on sums.
    With `rpo_alpha` > 0 it also logs `nll_loss`, the chosen answers' token-mean NLL; with several loss types, each
    type's term as `loss/<type>` (before its loss_weights weight, after WPO's pair weights), `loss` their weighted sum.
    Under ld_alpha the logged `logps/*` and `rewards/*` are of the desensitized log-probs, as TRL's.

    Args:
        loss_type: a name in `alignment.losses.DPO_LOSSES`, or a list of them summed with `loss_weights` (TRL's MPO
            recipe: [sigmoid, bco_pair, sft] with weights [0.8, 0.2, 1.0]): sigmoid (DPO), hinge (SLiC), ipo (IPO,
            its loss on per-token mean log-ratios), robust (rDPO), bco_pair (BCO, its reward shift the running mean
            of the training rewards, kept in the checkpoint), sppo_hard (SPPO), nca_pair (NCA), apo_zero / apo_down
            (APO), aot / aot_unpaired (AOT), exo_pair (EXO, needs label_smoothing > 0), discopop (DiscoPOP), sft (the
            chosen answers' token-mean NLL) or sigmoid_norm (sigmoid on per-token mean log-ratios).
        loss_weights: one weight per loss_type when it is a list; None: 1 each.
        ld_alpha: LD-DPO (Liu et al. 2024): the tokens of the longer answer of a pair past the shorter one's length
            count ld_alpha times in its log-probs (policy and reference), in [0, 1]; None: plain sums. Not with
            the reference cache (it keeps plain sums) nor padding_free (off when left out); computes full logits.
        use_weighting: WPO (Zhou et al. 2024): each pair's loss weighted by the policy's length-normalized
            probabilities of its two answers (detached); not with aot or aot_unpaired. Needs padding_free false (off
            when left out); computes full logits.
        f_divergence_type: f-DPO's divergence to the reference (Wang et al. 2023): reverse_kl (DPO), forward_kl,
            js_divergence or alpha_divergence; another than reverse_kl only with sigmoid, sigmoid_norm, hinge, ipo,
            exo_pair, robust, discopop and sft.
        f_alpha_divergence_coef: the alpha of alpha_divergence, as TRL writes it (f'(u) = (u^(alpha-1) - 1) /
            (alpha - 1)); set only with f_divergence_type alpha_divergence.
        label_smoothing: assumed share of flipped labels (conservative DPO for sigmoid and aot, rDPO for robust,
            EXO's epsilon for exo_pair); ignored by the others.
        rpo_alpha: weight of the chosen answers' NLL added to the loss (RPO, Pang et al. 2024); 0: none.
        discopop_tau: DiscoPOP's temperature (0.05 in its paper).
        sync_ref_model: TR-DPO (Gorbatovski et al. 2024): the reference is a second, frozen LoRA adapter that
            starts as the reference would (the bare base, or the starting adapter) and moves toward the policy's
            adapter every ref_model_sync_steps optimizer steps; scored in every step (not with the reference cache).
        ref_model_mixup_alpha: TR-DPO's alpha: each parameter of the reference adapter (LoRA's A and B apart)
            becomes alpha * the policy's + (1 - alpha) * its own; 1: a copy (the hard update). In (0, 1].
        ref_model_sync_steps: TR-DPO's tau: optimizer steps between two updates of the reference.
        reference_cache: compute the reference log-probs once before training and keep them on disk for later
            runs on the same model and data (a short run computes only the pairs its steps read, a longer one adds
            the rest); false: a reference forward in every step. None: on, unless ld_alpha or sync_ref_model is
            set (their reference cannot be cached), then off.
        reference_cache_dir: where the cache lives; None: `reference/` in the alignment cache
            (`$ALIGNMENT_CACHE`, default ~/.cache/alignment).
    """

    has_reference = True

    def __init__(
        self,
        *args,
        loss_type: DPOLossType | list[DPOLossType] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        rpo_alpha: float = 0.0,
        discopop_tau: float = 0.05,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        f_divergence_type: FDivergenceType = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        reference_cache: bool | None = None,
        reference_cache_dir: str | None = None,
        **kwargs,
    ):
        loss_types = _loss_types(loss_type)
        problem = loss_types_problem(loss_types, loss_weights, f_divergence_type=f_divergence_type,
                                     use_weighting=use_weighting, flag="--model.")  # fmt: skip
        for each in loss_types:
            problem = problem or label_smoothing_problem(label_smoothing, each, flag="--model.")
        _check(problem is None, str(problem))
        _check(rpo_alpha >= 0, f"--model.rpo_alpha must be >= 0, got {rpo_alpha}")
        _check(discopop_tau > 0, f"--model.discopop_tau must be > 0, got {discopop_tau}")
        _check(ld_alpha is None or 0 <= ld_alpha <= 1, f"--model.ld_alpha must be in [0, 1] or null, got {ld_alpha}")
        _check(f_alpha_divergence_coef == 0.5 or f_divergence_type == "alpha_divergence",
               f"--model.f_alpha_divergence_coef is read only with --model.f_divergence_type alpha_divergence, not "
               f"{f_divergence_type}")  # fmt: skip
        _check(sync_ref_model or (ref_model_mixup_alpha == 0.6 and ref_model_sync_steps == 512),
               "--model.ref_model_mixup_alpha and --model.ref_model_sync_steps are read only with "
               "--model.sync_ref_model true")  # fmt: skip
        _check(0 < ref_model_mixup_alpha <= 1, f"--model.ref_model_mixup_alpha must be in (0, 1], got "
               f"{ref_model_mixup_alpha}")  # fmt: skip
        _check(ref_model_sync_steps >= 1, f"--model.ref_model_sync_steps must be >= 1, got {ref_model_sync_steps}")
        cache = _reference_cache(reference_cache, ld_alpha=ld_alpha, sync_ref_model=sync_ref_model)
        super().__init__(*args, **kwargs)  # the base's save_hyperparameters() records these too
        self.reward_mean = RunningMean()  # bco_pair's reward shift: state for an exact resume
        self.reference = ReferenceScorer(self, cache=cache, cache_dir=reference_cache_dir)
        self.reference_synced_step = 0  # TR-DPO: the optimizer step the reference adapter was last moved at

    def padding_free_problem(self) -> str | None:
        if self.per_token:
            return "--model.ld_alpha and --model.use_weighting read per-token log-probs of the padded forward"
        return None

    @property
    def loss_types(self) -> list[str]:
        return _loss_types(self.hparams.loss_type)

    @property
    def per_token(self) -> bool:
        """Whether the log-probs need per-token values (LD-DPO's weights, WPO's): one forward with full logits."""
        return self.hparams.ld_alpha is not None or self.hparams.use_weighting

    @property
    def metric_names(self) -> list[str]:  # read by the base's __init__, after save_hyperparameters()
        terms = [f"loss/{loss_type}" for loss_type in self.loss_types] if len(self.loss_types) > 1 else []
        return REWARD_METRICS + (["nll_loss"] if self.hparams.rpo_alpha > 0 else []) + terms

    def compute_loss(self, batch: PreferenceBatch, split: Split = "train") -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        pair_weights = None
        if self.per_token:
            token_logps, answer_mask, log_sum_sq_probs = self.token_logps(batch, wpo=hp.use_weighting)  # (2B, T-1)
            policy_full = token_logps.sum(-1)  # (2B,)
            policy = (
                policy_full
                if hp.ld_alpha is None
                else (token_logps * ld_token_weights(answer_mask, hp.ld_alpha, token_logps.dtype)).sum(-1)
            )
            if hp.use_weighting:
                pair_weights = wpo_pair_weights(token_logps, log_sum_sq_probs, answer_mask)  # (B,)
        else:
            policy = policy_full = torch.cat(self.sequence_logps(batch, average=False))  # sums (2B,)
        policy_chosen, policy_rejected = policy.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(batch, split)
        chosen_tokens, rejected_tokens = answer_tokens(batch)
        # logged as TRL logs them, for every loss type: rewards of sums (ipo and sigmoid_norm's loss divides them)
        chosen_rewards = hp.beta * (policy_chosen - ref_chosen).detach()
        rejected_rewards = hp.beta * (policy_rejected - ref_rejected).detach()
        logps = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                          policy_full.chunk(2)[0])  # fmt: skip
        knobs = LossKnobs(hp.beta, hp.label_smoothing, hp.discopop_tau,
                          self._reward_shift(chosen_rewards, rejected_rewards, split), hp.f_divergence_type,
                          hp.f_alpha_divergence_coef)  # fmt: skip
        losses, terms = dpo_loss_terms(logps, self.loss_types, knobs, loss_weights=hp.loss_weights,
                                       pair_weights=pair_weights)  # fmt: skip
        metrics = reward_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        if len(terms) > 1:
            metrics.update({f"loss/{loss_type}": term.detach() for loss_type, term in terms.items()})
        if hp.rpo_alpha > 0:
            nll = chosen_nll(logps.policy_chosen_full, chosen_tokens)
            losses = rpo_loss(losses, nll, hp.rpo_alpha)
            metrics.update(loss=losses.detach(), nll_loss=nll.detach())
        return losses.mean(), metrics

    def token_logps(self, batch: PreferenceBatch, *, wpo: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-token log-probs (2B, T-1) of the answers under the current model, from one padded forward with full
        logits (LD-DPO and WPO read single tokens); the answer mask (2B, T-1); with `wpo`, log sum_v p(v)^2 at each
        position (2B, T-1), detached, else None. Position t scores token t+1, as `sequence_logps`."""
        logits = self(batch.input_ids, batch.attention_mask)[:, :-1]  # (2B, T-1, V)
        labels = batch.labels[:, 1:]  # (2B, T-1)
        answer_mask = labels != IGNORE_INDEX
        logits = logits.to(logps_dtype(logits.dtype))
        normalizer = torch.logsumexp(logits, dim=-1)  # (2B, T-1)
        picked = logits.gather(-1, labels.masked_fill(~answer_mask, 0).unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
        token_logps = (picked - normalizer) * answer_mask
        log_sum_sq_probs = None
        if wpo:
            with torch.no_grad():  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
                log_sum_sq_probs = torch.logsumexp(2 * logits, dim=-1) - 2 * normalizer
        return token_logps, answer_mask, log_sum_sq_probs

    def _reference_logps(self, batch: PreferenceBatch, split: Split) -> tuple[Tensor, Tensor]:
        """The reference's (chosen, rejected) log-probs, each (B,): from the reference scorer (its cache), or, under
        ld_alpha, LD-weighted sums of a reference forward in the step."""
        ld_alpha = self.hparams.ld_alpha
        if ld_alpha is None:
            return self.reference.logps(batch, average=False, split=split)
        with self.reference_model():
            token_logps, answer_mask, _ = self.token_logps(batch)
        return (token_logps * ld_token_weights(answer_mask, ld_alpha, token_logps.dtype)).sum(-1).chunk(2)

    def _reward_shift(self, chosen_rewards: Tensor, rejected_rewards: Tensor, split: Split) -> float:
        """bco_pair's delta (Jung et al. 2024): the mean of every training reward so far, this batch's included, over
        all processes; validation reads it without adding to it. 0 for the other loss types."""
        if "bco_pair" not in self.loss_types:
            return 0.0
        if split == "train":
            gather = self.all_gather if self.attached and self.trainer.world_size > 1 else None
            self.reward_mean.update(torch.cat([chosen_rewards, rejected_rewards]), gather=gather)
        return self.reward_mean.mean

    # ---- TR-DPO's moving reference ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        fresh = self.policy is None
        super().configure_model()
        if fresh and self.hparams.sync_ref_model:
            add_moving_reference(self.policy)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.sync_reference_if_due()

    def on_validation_start(self) -> None:
        self.sync_reference_if_due()

    def sync_reference_if_due(self) -> None:
        """Under sync_ref_model, the reference adapter moved toward the policy's once for an optimizer step that is
        a multiple of ref_model_sync_steps (TRL moves it at the end of that step). Done here, before the next
        forward that reads it (the next step's or validation's), so a checkpoint written between the step and the
        update holds the reference before it with its step, and a run resumed from it makes the same update."""
        hp, step = self.hparams, self.global_step
        if hp.sync_ref_model and step > self.reference_synced_step and step % hp.ref_model_sync_steps == 0:
            sync_reference(self.policy, hp.ref_model_mixup_alpha)
            self.reference_synced_step = step

    def reference_adapter(self) -> dict[str, Tensor]:
        """The moving reference's weights, each by the name of the policy parameter it follows."""
        names = {id(p): name for name, p in self.named_parameters()}
        return {names[id(current)]: reference for reference, current in reference_pairs(self.policy)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reward_mean"] = self.reward_mean.state_dict()
        if self.hparams.sync_ref_model:  # frozen, so not in the adapter-only state dict: kept beside it
            weights = {name: value.detach().clone() for name, value in self.reference_adapter().items()}
            checkpoint["moving_reference"] = {"synced_step": self.reference_synced_step, "weights": weights}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "reward_mean" in checkpoint:
            self.reward_mean.load_state_dict(checkpoint["reward_mean"])
        if not self.hparams.sync_ref_model:
            return
        saved = checkpoint.get("moving_reference")
        if saved is None:
            raise ConfigError("the checkpoint holds no moving reference (it was not trained with "
                              "--model.sync_ref_model true): start a new run to use TR-DPO")  # fmt: skip
        with torch.no_grad():
            for name, reference in self.reference_adapter().items():
                reference.copy_(saved["weights"][name])
        self.reference_synced_step = int(saved["synced_step"])

    def on_fit_start(self) -> None:
        self.reference.prepare()

    def on_fit_end(self) -> None:
        self.reference.finish()


def _reference_cache(reference_cache: bool | None, *, ld_alpha: float | None, sync_ref_model: bool) -> bool:
    """Whether the reference log-probs come from the cache: --model.reference_cache, or when it is left out (None),
    whether the reference can be cached at all. Set true where it cannot be: refused."""
    why = None
    if sync_ref_model:
        why = "--model.sync_ref_model: the reference moves during training, its log-probs change"
    elif ld_alpha is not None:
        why = "--model.ld_alpha: the cache keeps the reference's plain sums, LD-DPO weighs its tokens"
    _check(not (reference_cache and why), f"--model.reference_cache true does not go with {why}; leave it out or "
           "set it false")  # fmt: skip
    if reference_cache is None and why:
        log.info("reference cache off (%s): the reference is scored in every step", why)
    return why is None if reference_cache is None else reference_cache


def _loss_types(loss_type: str | list[str]) -> list[str]:
    """--model.loss_type as a list: one name (what configs and checkpoints before lists hold) or several."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)
