"""Preference pairs → token ids → padded (2B, T) batches, and the DataModule that wires them."""

from __future__ import annotations

import hashlib
import logging
import math
from array import array
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from alignment.encoding import tokenize_rows
from alignment.errors import ConfigError
from alignment.model import load_tokenizer
from alignment.rows import DataError, PreferenceRow, load_rows
from alignment.samplers import PairBatchSampler, ShardSampler
from alignment.tiny import TINY

log = logging.getLogger(__name__)

DEMO_PAIRS = Path(__file__).parent / "assets" / "demo_pairs.jsonl"
IGNORE_INDEX = -100


class TokenizedPair(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]  # the answer only; the full chosen sequence is prompt_ids + chosen_ids
    rejected_ids: list[int]
    index: int  # position of the pair in its split


class PreferenceBatch(NamedTuple):
    input_ids: Tensor  # (2B, T) chosen rows first, then rejected rows, right-padded
    attention_mask: Tensor  # (2B, T) 1 on real tokens
    labels: Tensor  # (2B, T) = input_ids on answer tokens, IGNORE_INDEX on prompt and padding
    index: Tensor  # (B,) position of each pair in its split


# ---- pure functions on ids ---------------------------------------------------------------------------------------


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    index: int,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    head: int = 0,
    template: bytes = b"",
) -> TokenizedPair | None:
    """Fit a pair into max_length: the answers keep their START; a prompt over max_prompt_length keeps its first
    `head` tokens and its END (see `cut_prompt`). None when no answer token would be left, or the prompt cannot be
    cut to max_prompt_length."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = cut_prompt(prompt_ids, max_prompt_length, head, template)
        if prompt_ids is None:
            return None
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return TokenizedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], index)


def cut_prompt(prompt_ids: list[int], limit: int, head: int = 0, template: bytes = b"") -> list[int] | None:
    """At most `limit` tokens: the first `head` (BOS, system turn: a cut prompt still begins as the template
    begins), then the prompt's end. `template[i]` is 1 where the chat template wrote token i: the end never starts
    inside a run of such tokens (a marker like `<|user|>` may be several tokens), and keeps the final run (the
    generation prompt) whole. None when the head and that final run alone do not fit."""
    final_run = 0
    while final_run < len(template) - head and template[len(template) - 1 - final_run]:
        final_run += 1
    if head + final_run > limit:
        return None
    start = len(prompt_ids) - (limit - head)
    while head < start < len(template) and template[start] and template[start - 1]:
        start += 1
    return prompt_ids[:head] + prompt_ids[start:]


def collate_pairs(pairs: list[TokenizedPair], *, pad_id: int, pad_to_multiple_of: int = 1) -> PreferenceBatch:
    """Stack B pairs into one (2B, T) batch: chosen rows, then rejected rows, right-padded."""
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lengths = [len(p.prompt_ids) for p in pairs] * 2
    width = max(len(s) for s in sequences)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ids = torch.tensor(sequence, dtype=torch.long)
        input_ids[row, : len(sequence)] = ids
        attention_mask[row, : len(sequence)] = 1
        labels[row, prompt_length : len(sequence)] = ids[prompt_length:]
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return PreferenceBatch(input_ids, attention_mask, labels, index)


def pair_length(pair: TokenizedPair) -> int:
    """Width of the pair's longer row: what it costs in a padded batch."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of the token ids of every pair, in order: covers the data, tokenizer, chat template and truncation."""
    digest = hashlib.sha256()
    for pair in pairs:
        for part in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(part).to_bytes(4, "little"))
            digest.update(array("q", part).tobytes())
    return digest.hexdigest()


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
) -> list[TokenizedPair]:
    """Tokenize and truncate a split; says in the log how many rows were cut and dropped."""
    encoded = tokenize_rows(rows, tokenizer, use_chat_template, f"tokenizing {split}", layout_over=max_prompt_length)
    pairs, dropped, long_heads, cut_prompts, cut_answers, same = [], [], [], 0, 0, 0
    for row, enc in zip(rows, encoded, strict=True):
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
        same += pair.chosen_ids == pair.rejected_ids
        pairs.append(pair)
    log.info(
        "%s: %d pairs; %d prompts cut to max_prompt_length=%s (their start and end kept), "
        "%d pairs with answers cut to max_length=%d",
        split, len(pairs), cut_prompts, max_prompt_length, cut_answers, max_length,
    )  # fmt: skip
    if dropped:
        log.warning(
            "%s: dropped %d pairs whose prompt leaves no room for an answer in max_length=%d (first: %s)",
            split, len(dropped), max_length, ", ".join(dropped[:3]),
        )  # fmt: skip
    if long_heads:
        log.warning(
            "%s: dropped %d pairs whose template start (BOS, system turn, first header) and generation prompt "
            "alone exceed max_prompt_length=%d (first: %s)",
            split, len(long_heads), max_prompt_length, ", ".join(long_heads[:3]),
        )  # fmt: skip
    if same:
        log.warning("%s: %d pairs have identical chosen and rejected tokens after truncation", split, same)
    if not pairs:
        raise DataError(f"{split}: no pair fits in max_length={max_length} (max_prompt_length={max_prompt_length})")
    return pairs


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

    def _read(self, path: str | None, split: str) -> list[PreferenceRow]:
        return load_rows(str(path or DEMO_PAIRS), split=split, columns=self.hparams.columns, limit=self.hparams.limit)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer, hp.revision)
        sources = self._sources()
        train_rows = self._read(*sources[0])
        if len(sources) > 1:
            val_rows = self._read(*sources[1])
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
        self.train_set = PairDataset(build(train_rows, split="train"))
        self.val_set = PairDataset(build(val_rows, split="validation")) if val_rows else None

    def digest(self, split: str) -> str:
        """sha256 of a split's token ids ("train" or "validation"), computed once: the reference cache's key and
        the resume check both use it."""
        if split not in self._digests:
            dataset = self.train_set if split == "train" else self.val_set
            self._digests[split] = pairs_digest(dataset.pairs)
        return self._digests[split]

    def collate(self, pairs: list[TokenizedPair]) -> PreferenceBatch:
        pad_to = self.hparams.pad_to_multiple_of
        return collate_pairs(pairs, pad_id=self.tokenizer.pad_token_id, pad_to_multiple_of=pad_to)

    def _loader(self, dataset: PairDataset, **kwargs) -> StatefulDataLoader:
        # a generator of its own: creating an iterator draws a seed from it, which would otherwise come from the
        # global RNG and shift LoRA dropout's masks between a resumed run and an uninterrupted one
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return StatefulDataLoader(
            dataset, collate_fn=self.collate, num_workers=self.hparams.num_workers, generator=generator, **kwargs
        )

    def train_dataloader(self) -> StatefulDataLoader:
        # sharded here, across the trainer's processes: under DDP the Trainer needs use_distributed_sampler=False
        # (Lightning refuses to inject its sampler into this batch sampler and says so; the CLI checks it first)
        trainer, world, rank = self.trainer, 1, 0
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
        sampler = PairBatchSampler(
            [pair_length(p) for p in self.train_set],
            self.hparams.batch_size,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            group_by_length=self.hparams.group_by_length,
            seed=self.hparams.seed,
        )
        return self._loader(self.train_set, batch_sampler=sampler)

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
