"""The training batch sampler (seeded, sharded across processes, optionally grouped by length, resumable) and the
evaluation sampler (sharded without repeats)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import torch
from torch.utils.data import DistributedSampler, Sampler

MEGABATCH = 32  # global batches sorted together when grouping by length: enough to match lengths, still shuffled


class PairBatchSampler(Sampler[list[int]]):
    """Batches of pair positions for one process out of `num_replicas`.

    Each step has one *global* batch of `batch_size * num_replicas` pairs, drawn by a permutation seeded with
    (seed, epoch); process `rank` takes every `num_replicas`-th pair of it. So N processes with batch b see the
    same pairs at each step as one process with batch N*b, and the order depends on nothing but seed and epoch:
    a resumed run (the stateful loader skips the batches already yielded) sees what the uninterrupted run saw.

    With `group_by_length`, the permutation is cut into runs of MEGABATCH global batches, each run sorted by
    length, so a batch holds pairs of similar length (less padding); the batches are then shuffled, except that
    the longest comes first, so a batch that does not fit in memory fails at the first step, not hours in.

    A last global batch smaller than the others is topped up with pairs from the start of the permutation until
    every process has at least one pair; every process then steps the same number of times.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        seed: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.shuffle, self.group_by_length, self.seed = shuffle, group_by_length, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // (self.batch_size * self.num_replicas))

    def global_batches(self) -> list[list[int]]:
        n, size = len(self.lengths), self.batch_size * self.num_replicas
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        if self.group_by_length:
            runs = [order[i : i + size * MEGABATCH] for i in range(0, n, size * MEGABATCH)]
            order = [i for run in runs for i in sorted(run, key=lambda i: -self.lengths[i])]
        batches = [order[i : i + size] for i in range(0, n, size)]
        if self.group_by_length and self.shuffle and len(batches) > 1:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            rest = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist() if b != longest]
            batches = [batches[longest], *rest]
        if batches and len(batches[-1]) < self.num_replicas:
            batches[-1] = batches[-1] + (order * self.num_replicas)[: self.num_replicas - len(batches[-1])]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.num_replicas]


class ShardSampler(DistributedSampler):
    """Positions `rank, rank + num_replicas, ...` of a dataset, without repeats: for evaluation under DDP.

    torch's DistributedSampler pads the shards to equal length with repeated items, which metrics averaged over
    the validation set would count twice; here the shards differ in length by at most one instead. Every process
    must get at least one item (a process with none would leave the others waiting), so `len(dataset)` must be at
    least `num_replicas`. A DistributedSampler subclass: Lightning keeps it and does not inject its own.
    """

    def __init__(self, dataset: Sized, *, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        if len(dataset) < num_replicas:
            raise ValueError(f"{len(dataset)} items cannot give each of {num_replicas} processes one")
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))
