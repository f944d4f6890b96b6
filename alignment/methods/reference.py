"""The reference scorer: the reference model's log-probs for a method that has one (DPO, KTO), from the reference
cache (`alignment.methods.reference_cache`) or a forward of the reference.

A method holds one (`module.reference`) and asks it for the log-probs of a batch's two answer rows per item: a
pair's chosen and rejected answers, or KTO's completion and its mismatched KL completion. The reference model is
the method's own policy inside `module.reference_model()`: the base with adapters off, or the frozen reference
adapter (the starting adapter, or TR-DPO's moving reference: `add_moving_reference`, `sync_reference`).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from peft import PeftModel
from torch import Tensor
from torch.nn import Parameter

from alignment.data import IGNORE_INDEX, PreferenceBatch, PreferenceDataModule, Split, UnpairedBatch
from alignment.hub import resolve_base
from alignment.methods.reference_cache import (
    ReferenceCache,
    ReferencePassStopped,
    Tables,
    filled,
    reference_tables,
    save_added_rows,
    train_pairs_read,
    weights_identity,
)
from alignment.model.load import POLICY_ADAPTER, REFERENCE_ADAPTER

log = logging.getLogger(__name__)


class ReferenceScorer:
    """Reference log-probs for `module` (a PreferenceModule with `reference_model()`): cached when `cache` is on and
    the trainer's data is a PreferenceDataModule, else computed in every step.

    `tables` (split -> (N, 4): chosen and rejected summed log-probs, their token counts; NaN rows not computed yet)
    are filled by `prepare` at the start of fit; rows a step needs that the pass left out are computed then and
    written back to the cache entry (`key`) by `finish`.
    """

    def __init__(self, module, *, cache: bool = True, cache_dir: str | None = None):
        self.module = module
        self.cache, self.cache_dir = cache, cache_dir
        self.tables: Tables = {}
        self.key: str | None = None  # the cache entry the tables belong to
        self._rows_added: dict[str, list[Tensor]] = {}  # split -> positions computed in the steps, to write back

    def logps(self, batch: PreferenceBatch | UnpairedBatch, *, average: bool, split: Split = "train"
              ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(first, second) answer rows' log-probs (each (B,)) under the reference: from the tables when they hold
        `split`, else a forward of the reference model."""
        module, table = self.module, self.tables.get(split)
        if table is None:
            with module.reference_model():
                return module.sequence_logps(batch, average=average)
        index = batch.index.cpu()
        missing = ~filled(table[index])
        strategy = module.trainer.strategy if module.attached else None
        if getattr(strategy, "forwards_in_step", False):
            # a base sharded across the processes: a forward needs every one of them, so when one computes rows
            # here, each does (one that lacks none computes its batch's rows again)
            if strategy.reduce_boolean_decision(bool(missing.any()), all=False) and not missing.any():
                missing = ~missing
        if missing.any():  # rows the pass left out: computed here, once, as the pass computes them
            self._compute_rows(split, index[missing])
        rows = table[index].to(module.device)  # (B, 4)
        chosen, rejected, chosen_tokens, rejected_tokens = rows.unbind(1)
        if average:  # as sequence_logps(average=True) divides
            return chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        return chosen, rejected

    def _compute_rows(self, split: Split, positions: Tensor) -> None:
        datamodule = self.module.trainer.datamodule
        items = datamodule.items(split)
        values = self.score([items[i] for i in positions.tolist()], collate=datamodule.collate)
        self.tables[split][positions] = torch.stack([t.float().cpu() for t in values], dim=1)
        self._rows_added.setdefault(split, []).append(positions)

    @torch.no_grad()
    def score(self, items: list, collate) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The reference pass over `items`: summed log-probs of each item's two answer rows and their token
        counts."""
        module = self.module
        collated = collate(items)  # a PreferenceBatch, or KTO's UnpairedBatch: two answer rows per item
        batch = type(collated)(*(t.to(module.device) for t in collated))
        with module.trainer.precision_plugin.forward_context(), module.reference_model():  # eval: no dropout
            chosen, rejected = module.sequence_logps(batch, average=False)
        chosen_tokens, rejected_tokens = (batch.labels != IGNORE_INDEX).sum(-1).chunk(2)
        return chosen, rejected, chosen_tokens, rejected_tokens

    def prepare(self) -> None:
        """At the start of fit: the tables of the rows this run reads, from the cache or a reference pass."""
        self.tables, self._rows_added = {}, {}
        trainer = self.module.trainer
        datamodule = trainer.datamodule
        if not self.cache:
            return
        if not isinstance(datamodule, PreferenceDataModule):
            log.warning("reference cache off: it needs a PreferenceDataModule; the reference runs in every step")
            return
        splits = {split: items for split in ("train", "validation") if (items := datamodule.items(split)) is not None}
        train = train_pairs_read(trainer, datamodule.train_batch_sampler())
        # a short run: the pairs its steps read; validation rows as validation reads them (it may never run)
        needed = {"train": train, "validation": None if train is None else []}
        try:
            self.key, self.tables = reference_tables(
                trainer,
                splits,
                partial(self.score, collate=datamodule.collate),
                identity=self.identity(),
                digests={split: datamodule.digest(split) for split in splits},
                cache_dir=self.cache_dir,
                batch_size=datamodule.eval_batch_size,
                needed=needed,
            )
        except ReferencePassStopped as stop:
            if trainer.is_global_zero:
                log.warning("stopped by %s during the reference pass; the rows computed are kept in the cache and "
                            "a rerun continues from them", stop.signal_name)  # fmt: skip
            raise SystemExit(stop.exit_code) from None

    def finish(self) -> None:
        """At the end of fit: the rows computed during the steps written into the cache entry; the tables
        forgotten (a later validate() may read other data)."""
        if self.tables and self.key is not None:
            added = {s: torch.cat(p) for s, p in self._rows_added.items()}
            save_added_rows(self.module.trainer, ReferenceCache(self.cache_dir), self.key, self.tables, added,
                            meta=self.identity())  # fmt: skip
        self.tables, self._rows_added = {}, {}

    def identity(self) -> dict:
        """What, besides the token ids, changes the reference log-probs."""
        module = self.module
        hp = module.hparams
        identity = {
            "weights": weights_identity(resolve_base(hp.base, hp.revision), hp.revision),
            "load_in_4bit": hp.load_in_4bit,
            "quantization": "nf4+double-quant",
            "compute_dtype": str(module.policy.get_base_model().dtype),
            "device": module.device.type,
            "precision": str(module.trainer.precision),
        }
        if module.starting_adapter is not None:  # the reference is that adapter: an entry of the bare base is unread
            identity["adapter"] = module.starting_adapter
        return identity


# ---- TR-DPO's moving reference ------------------------------------------------------------------------------------


def add_moving_reference(policy: PeftModel) -> None:
    """A second LoRA adapter beside the policy's (`REFERENCE_ADAPTER`), frozen, equal to the policy's adapter now: the
    bare base while that one is new (LoRA's B starts at 0), or the starting adapter. `sync_reference` moves it."""
    if REFERENCE_ADAPTER not in policy.peft_config:  # training from an adapter: its frozen copy is already there
        policy.add_adapter(REFERENCE_ADAPTER, policy.peft_config[POLICY_ADAPTER])
    with torch.no_grad():
        for reference, current in reference_pairs(policy):
            reference.copy_(current)
            reference.requires_grad_(False)


def reference_pairs(policy: PeftModel) -> list[tuple[Parameter, Parameter]]:
    """(reference adapter's, policy adapter's) parameter for each LoRA weight (A and B of every target module),
    matched by name."""
    params = dict(policy.named_parameters())
    mine, theirs = f".{POLICY_ADAPTER}.", f".{REFERENCE_ADAPTER}."
    return [(params[name.replace(mine, theirs)], p) for name, p in params.items() if mine in name and "lora_" in name]


@torch.no_grad()
def sync_reference(policy: PeftModel, alpha: float) -> None:
    """TR-DPO's soft update (Gorbatovski et al. 2024, arXiv:2404.09656), as TRL's SyncRefModelCallback applies it:
    theta_ref <- alpha * theta + (1 - alpha) * theta_ref on each parameter of the reference adapter, LoRA's A and B
    apart (not their product B @ A); alpha = 1 is the hard update, a copy."""
    for reference, current in reference_pairs(policy):
        reference.mul_(1.0 - alpha).add_(current, alpha=alpha)
