"""The DataModule: rows read and checked, tokenized, truncated and split, then served as batches by resumable
samplers.

Methods that train on single answers get other items from the same module: SFT a prompt and one answer per row,
padded to (B, T) batches; KTO a prompt, its answer and the answer of another row (the mismatched pair of its KL
estimate), with a desirable/undesirable label, padded to (2B, T) as pairs are. The method says which (its
`data_kind`); the rows' format is told from their columns (`alignment.data.rows.load_completions`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from alignment.data.batches import (
    DataKind,
    PreferenceBatch,
    SequenceBatch,
    Split,
    TokenizedPair,
    TokenizedSequence,
    TokenizedUnpaired,
    UnpairedBatch,
    collate_pairs,
    collate_sequences,
    collate_unpaired,
    cut_prompt,
    pair_length,
    pairs_digest,
    truncate_pair,
)
from alignment.data.encoding import tokenize_rows
from alignment.data.rows import CompletionRow, DataError, PreferenceRow, load_completions, load_rows
from alignment.data.samplers import PairBatchSampler, ShardSampler
from alignment.errors import ConfigError
from alignment.hub.tiny import TINY
from alignment.hub.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEMO_PAIRS = Path(__file__).parents[1] / "assets" / "demo_pairs.jsonl"


class PairDataset(Dataset):
    def __init__(self, pairs: list[TokenizedPair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.pairs[i]


def build_pairs(
    rows: list[PreferenceRow],
    tokenizer: PreTrainedTokenizerBase,
    *,
    use_chat_template: bool,
    max_length: int,
    max_prompt_length: int | None,
    split: str,
    example: Callable[[TokenizedPair, int], TokenizedSequence | TokenizedUnpaired] | None = None,
    unit: str = "pairs",
) -> list:
    """Tokenize and truncate a split; says in the log how many rows were cut and dropped.

    `example(pair, position)` turns the pair made of the row at `position` into the split's item (SFT, KTO: the
    rows come as pairs of one answer and another, see `single_answer_rows`); `unit` names the items in the log.
    """
    encoded = tokenize_rows(rows, tokenizer, use_chat_template, f"tokenizing {split}", layout_over=max_prompt_length,
                            max_length=max_length)  # fmt: skip
    pairs, dropped, long_heads, cut_prompts, cut_answers, same = [], [], [], 0, 0, 0
    for position, (row, enc) in enumerate(zip(rows, encoded, strict=True)):
        pair = truncate_pair(
            enc.prompt_ids, enc.chosen_ids, enc.rejected_ids, len(pairs),
            max_length=max_length, max_prompt_length=max_prompt_length, head=enc.head, template=enc.template,
        )  # fmt: skip
        if pair is None:
            uncuttable = max_prompt_length is not None and len(enc.prompt_ids) > max_prompt_length
            uncuttable = uncuttable and cut_prompt(enc.prompt_ids, max_prompt_length, enc.head, enc.template) is None
            (long_heads if uncuttable else dropped).append(row.source)
            continue
        cut_prompts += len(pair.prompt_ids) < len(enc.prompt_ids)
        cut_answers += len(pair.chosen_ids) < len(enc.chosen_ids) or len(pair.rejected_ids) < len(enc.rejected_ids)
        if example is None:
            same += pair.chosen_ids == pair.rejected_ids
            pairs.append(pair)
        else:
            pairs.append(example(pair, position))
    log.info(
        "%s: %d %s; %d prompts cut to max_prompt_length=%s (their start and end kept), "
        "%d %s with answers cut to max_length=%d",
        split, len(pairs), unit, cut_prompts, max_prompt_length, cut_answers, unit, max_length,
    )  # fmt: skip
    if dropped:
        log.warning(
            "%s: dropped %d %s whose prompt leaves no room for an answer in max_length=%d (first: %s)",
            split, len(dropped), unit, max_length, ", ".join(dropped[:3]),
        )  # fmt: skip
    if long_heads:
        log.warning(
            "%s: dropped %d %s whose template start (BOS, system turn, first header) and generation prompt "
            "alone exceed max_prompt_length=%d (first: %s)",
            split, len(long_heads), unit, max_prompt_length, ", ".join(long_heads[:3]),
        )  # fmt: skip
    if same:
        log.warning("%s: %d pairs have identical chosen and rejected tokens after truncation", split, same)
    if not pairs:
        raise DataError(
            f"{split}: no {unit.removesuffix('s')} fits in max_length={max_length} "
            f"(max_prompt_length={max_prompt_length})"
        )
    return pairs


def single_answer_rows(
    rows: list[PreferenceRow | CompletionRow], kind: DataKind, seed: int
) -> tuple[list[PreferenceRow], list[bool]]:
    """Rows of single answers as pairs for `tokenize_rows`, and their labels.

    sequences (SFT): (prompt, answer, answer), the answer being a pair's chosen one, or a completion; completions
    labelled undesirable are left out. unpaired (KTO): each pair gives a desirable row (chosen) and an undesirable
    one (rejected), as TRL's `unpair_preference_dataset`; then (prompt, completion, KL completion) where the KL
    completion is that of the row before it in a seeded shuffle of the split: every completion serves once as
    another prompt's mismatched answer.
    """
    singles: list[CompletionRow] = []
    for row in rows:
        if isinstance(row, PreferenceRow):
            singles.append(CompletionRow(row.prompt, row.chosen, True, row.system, row.source))
            if kind == "unpaired":
                singles.append(CompletionRow(row.prompt, row.rejected, False, row.system, row.source))
        elif kind == "unpaired" or row.label is not False:
            singles.append(row)
    if kind == "sequences":
        if len(singles) < len(rows):
            log.info("SFT: %d completions labelled undesirable left out", len(rows) - len(singles))
        return [PreferenceRow(r.prompt, r.completion, r.completion, r.system, r.source) for r in singles], []
    if len(singles) < 2:
        raise DataError(f"{rows[0].source}: KTO needs at least 2 rows in a split (its KL estimate pairs each prompt "
                        "with another row's completion)")  # fmt: skip
    order = torch.randperm(len(singles), generator=torch.Generator().manual_seed(seed)).tolist()
    kl_source = {row: order[k - 1] for k, row in enumerate(order)}  # a derangement: never the row itself
    pairs = [
        PreferenceRow(r.prompt, r.completion, singles[kl_source[i]].completion, r.system, r.source)
        for i, r in enumerate(singles)
    ]
    return pairs, [bool(r.label) for r in singles]


def build_single_answers(rows: list, *, build: Callable, kind: DataKind, seed: int, split: str) -> list:
    """`build_pairs` for SFT's (prompt, answer) rows or KTO's labelled rows, from `single_answer_rows`."""
    pairs, labels = single_answer_rows(rows, kind, seed)
    if rows and not pairs:  # SFT, every row labelled false: not a matter of lengths
        file = re.sub(r", (line|row) \d+$", "", rows[0].source)
        raise DataError(
            f"{file}: all {len(rows)} rows of the {split} split have field 'label' false (undesirable), and SFT "
            "trains on desirable answers only: nothing to train on; train them with KTO (--model alignment.KTO), or "
            "set their label to true"
        )

    def example(pair: TokenizedPair, position: int) -> TokenizedSequence | TokenizedUnpaired:
        if kind == "sequences":
            return TokenizedSequence(pair.prompt_ids, pair.chosen_ids, pair.index)
        return TokenizedUnpaired(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.index, labels[position])

    return build(pairs, split=split, example=example, unit="rows")


def usable_val_split(path: str | None, val_split: str | None, val_path: str | None, val_fraction: float) -> str | None:
    """`val_split`, or None (with a warning) for a hub config run on a local file: a split name means nothing there,
    and reading the same file again would validate on the training pairs; `val_fraction` of it is held out instead."""
    if val_split is None or val_path is not None or path is None or not Path(path).exists():
        return val_split
    log.warning(
        "--data.val_split %r ignored: %s is a local file, not a hub dataset; holding out --data.val_fraction %s "
        "of it instead (or name a file with --data.val_path); saved as val_split: null",
        val_split, path, val_fraction,
    )  # fmt: skip
    return None


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from a file (JSONL, JSON, Parquet, CSV) or a `datasets` hub name.

    Args:
        path: the training pairs; None uses the small demo set bundled with the package.
        split: split to read when `path` is a hub dataset.
        val_path: validation pairs (file or hub name); without it, `val_fraction` of `path` is held out.
        val_split: split of `val_path` (or of `path` when `val_path` is None) to validate on instead.
        val_fraction: share of the training rows held out (seeded) when no validation set is named; 0: none.
        columns: our field -> the data's column, e.g. {"prompt": "question", "system": "system"}.
        limit: read only the first N rows of each file (quick experiments).
        tokenizer: the base model's name or path (linked from the model by the CLI).
        revision: the base's hub revision (linked from the model by the CLI).
        use_chat_template: apply the tokenizer's chat template; None: when the tokenizer has one.
        max_length: tokens of prompt + answer; answers are cut at the end to fit.
        max_prompt_length: the prompt keeps its last tokens; None: no separate limit.
        batch_size: pairs per training batch in each process (per optimizer step: times the processes and
            --trainer.accumulate_grad_batches).
        eval_batch_size: pairs per validation batch (and per batch of the reference pass); None: batch_size.
        pad_to_multiple_of: pad batch width to a multiple of this (8 suits tensor cores).
        group_by_length: batch pairs of similar length together (less padding, faster); the longest batch first.
        num_workers: data loader worker processes; 0 loads in the training process (the batches are ready-made
            token ids, so workers rarely pay).
        seed: seeds the held-out split and the order of the training pairs (the same order on resume).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        split: str = "train",
        val_path: str | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.1,
        columns: dict[str, str] | None = None,
        limit: int | None = None,
        tokenizer: str = TINY,
        revision: str | None = None,
        use_chat_template: bool | None = None,
        max_length: int = 1024,
        max_prompt_length: int | None = 512,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int = 8,
        group_by_length: bool = False,
        num_workers: int = 0,
        seed: int = 42,
    ):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "max_length": max_length}
        sizes |= {"pad_to_multiple_of": pad_to_multiple_of, "max_prompt_length": max_prompt_length}
        for flag, value in sizes.items():
            if value is not None and value < 1:
                raise ConfigError(f"--data.{flag} must be at least 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"--data.num_workers must be 0 or more, got {num_workers}")
        val_split = usable_val_split(path, val_split, val_path, val_fraction)
        self.save_hyperparameters()
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._digests: dict[str, str] = {}
        self.data_kind: DataKind | None = None  # None: what the trainer's module trains on (its data_kind), or pairs
        self._built_kind: DataKind | None = None

    def prepare_data(self) -> None:
        # hub datasets download here, once per node; local files are read in setup()
        for path, split in self._sources():
            if path is not None and not Path(path).exists():
                load_rows(path, split=split, columns=self.hparams.columns, limit=self.hparams.limit)

    def _sources(self) -> list[tuple[str | None, str]]:
        hp = self.hparams
        sources: list[tuple[str | None, str]] = [(hp.path, hp.split)]
        if hp.val_path is not None or hp.val_split is not None:
            sources.append((hp.val_path or hp.path, hp.val_split or hp.split))
        return sources

    def kind(self) -> DataKind:
        """What the items are: `data_kind` when set, else the data_kind of the trainer's module, else pairs."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return self.data_kind or getattr(module, "data_kind", "pairs")

    def _read(self, path: str | None, split: str, kind: DataKind = "pairs") -> list:
        hp, path = self.hparams, str(path or DEMO_PAIRS)
        if kind == "pairs":
            return load_rows(path, split=split, columns=hp.columns, limit=hp.limit)
        return load_completions(path, split=split, columns=hp.columns, limit=hp.limit, labelled=kind == "unpaired")

    def setup(self, stage: str | None = None) -> None:
        kind = self.kind()
        if self.train_set is not None and kind == self._built_kind:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer, hp.revision)
        sources = self._sources()
        train_rows = self._read(*sources[0], kind)
        if len(sources) > 1:
            val_rows = self._read(*sources[1], kind)
        else:
            train_rows, val_rows = split_rows(train_rows, hp.val_fraction, hp.seed)
        chat = hp.use_chat_template if hp.use_chat_template is not None else bool(self.tokenizer.chat_template)
        if chat and not self.tokenizer.chat_template:
            raise DataError(f"--data.use_chat_template is true but the tokenizer of {hp.tokenizer!r} has no template")
        build = partial(
            build_pairs,
            tokenizer=self.tokenizer,
            use_chat_template=chat,
            max_length=hp.max_length,
            max_prompt_length=hp.max_prompt_length,
        )
        if kind != "pairs":
            build = partial(build_single_answers, build=build, kind=kind, seed=hp.seed)
        self.train_set = PairDataset(build(train_rows, split="train"))
        self.val_set = PairDataset(build(val_rows, split="validation")) if val_rows else None
        self._built_kind, self._digests = kind, {}

    def digest(self, split: str) -> str:
        """sha256 of a split's token ids ("train" or "validation"), computed once: the reference cache's key and
        the resume check both use it."""
        if split not in self._digests:
            dataset = self.train_set if split == "train" else self.val_set
            self._digests[split] = pairs_digest(dataset.pairs)
        return self._digests[split]

    def collate(self, pairs: list) -> PreferenceBatch | SequenceBatch | UnpairedBatch:
        pad_to = self.hparams.pad_to_multiple_of
        collate = {TokenizedSequence: collate_sequences, TokenizedUnpaired: collate_unpaired}.get(
            type(pairs[0]), collate_pairs
        )
        return collate(pairs, pad_id=self.tokenizer.pad_token_id, pad_to_multiple_of=pad_to)

    def _loader(self, dataset: PairDataset, **kwargs) -> StatefulDataLoader:
        # a generator of its own: creating an iterator draws a seed from it, which would otherwise come from the
        # global RNG and shift LoRA dropout's masks between a resumed run and an uninterrupted one
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return StatefulDataLoader(
            dataset, collate_fn=self.collate, num_workers=self.hparams.num_workers, generator=generator, **kwargs
        )

    # ---- what a method reads of the data (the reference pass, the schedule's length) ------------------------------

    def items(self, split: Split) -> list | None:
        """The tokenized items of `split` (pairs, or single answers: what `kind` says), in dataset order; None when
        there is no such split (no validation set)."""
        dataset = self.train_set if split == "train" else self.val_set
        return None if dataset is None else dataset.pairs

    @property
    def eval_batch_size(self) -> int:
        """Items per validation batch, and per batch of a reference pass."""
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_batch_sampler(self) -> PairBatchSampler:
        """The batches of training items this process reads, epoch by epoch (`set_epoch`): the order the training
        loader follows, sharded across the trainer's processes."""
        trainer, world, rank = self.trainer, 1, 0
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
        return PairBatchSampler(
            [pair_length(p) for p in self.train_set],
            self.hparams.batch_size,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            group_by_length=self.hparams.group_by_length,
            seed=self.hparams.seed,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        # sharded here, across the trainer's processes: under DDP the Trainer needs use_distributed_sampler=False
        # (Lightning refuses to inject its sampler into this batch sampler and says so; the CLI checks it first)
        return self._loader(self.train_set, batch_sampler=self.train_batch_sampler())

    def val_dataloader(self) -> StatefulDataLoader | list:
        if self.val_set is None:
            return []
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = None
        if world > 1 and len(self.val_set) >= world:
            # a DistributedSampler pads the shards with repeated pairs, which val/* would count twice
            sampler = ShardSampler(self.val_set, num_replicas=world, rank=self.trainer.global_rank)
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(self.val_set, batch_size=batch_size, sampler=sampler)


def split_rows(rows: list[PreferenceRow], fraction: float, seed: int) -> tuple[list[PreferenceRow], list]:
    """Seeded hold-out: (train, validation); at least one row each side when fraction > 0 and rows allow."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
