"""The training batch sampler: every pair once an epoch, the same steps on N processes as on one, grouping."""

import pytest
from torch.utils.data import DistributedSampler

from alignment.data.samplers import MEGABATCH, PairBatchSampler, ShardSampler


def epoch(sampler: PairBatchSampler, number: int = 0) -> list[list[int]]:
    sampler.set_epoch(number)
    return list(sampler)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_each_pair_once_per_epoch_and_a_new_order_each_epoch(group_by_length):
    sampler = PairBatchSampler(list(range(50)), 4, seed=1, group_by_length=group_by_length)
    first, second = epoch(sampler, 0), epoch(sampler, 1)
    assert len(first) == len(sampler) == 13
    assert sorted(i for batch in first for i in batch) == list(range(50))
    assert first != second and epoch(sampler, 0) == first  # seeded by (seed, epoch) alone


@pytest.mark.parametrize("group_by_length", [False, True])
def test_two_processes_of_batch_b_see_the_pairs_one_process_of_batch_2b_sees(group_by_length):
    lengths = [(7 * i) % 23 for i in range(40)]
    one = epoch(PairBatchSampler(lengths, 8, seed=3, group_by_length=group_by_length))
    shards = [epoch(PairBatchSampler(lengths, 4, num_replicas=2, rank=r, seed=3, group_by_length=group_by_length))
              for r in range(2)]  # fmt: skip
    assert len(shards[0]) == len(shards[1]) == len(one) == 5
    for step, batch in enumerate(one):
        assert sorted(shards[0][step] + shards[1][step]) == sorted(batch)
        assert not set(shards[0][step]) & set(shards[1][step])


def test_last_batch_gives_every_process_at_least_one_pair():
    shards = [list(PairBatchSampler([1] * 9, 4, num_replicas=3, rank=r, seed=0)) for r in range(3)]
    assert [len(s) for s in shards] == [1, 1, 1]  # 9 pairs, global batch 12: one short step
    assert all(len(s[-1]) >= 1 for s in shards)
    tiny = [list(PairBatchSampler([1], 1, num_replicas=2, rank=r)) for r in range(2)]
    assert tiny == [[[0]], [[0]]]  # one pair, two processes: the pair is repeated rather than a process idle


def test_grouping_puts_similar_lengths_together_and_the_longest_batch_first():
    lengths = [(37 * i) % 101 for i in range(4 * MEGABATCH)]
    grouped = epoch(PairBatchSampler(lengths, 4, seed=0, group_by_length=True))
    plain = epoch(PairBatchSampler(lengths, 4, seed=0))

    def padding(batches):  # tokens of padding when every batch is padded to its longest pair
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    assert grouped[1:] != sorted(grouped[1:], key=lambda b: -max(lengths[i] for i in b))  # the rest shuffled


@pytest.mark.parametrize(("n", "world"), [(7, 3), (6, 3), (3, 3), (10, 4), (5, 1)])
def test_evaluation_shards_cover_every_pair_once(n, world):
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    shards = [list(ShardSampler(range(n), num_replicas=world, rank=rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1 and min(map(len, shards)) >= 1
    for rank, shard in enumerate(shards):
        sampler = ShardSampler(range(n), num_replicas=world, rank=rank)
        assert len(sampler) == len(shard) and isinstance(sampler, DistributedSampler)  # Lightning leaves it alone
        # what the Lightning sampler it replaces gave
        assert shard == list(UnrepeatedDistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))


def test_evaluation_shards_need_one_pair_per_process():
    with pytest.raises(ValueError, match="2 items cannot give each of 3 processes one"):
        ShardSampler(range(2), num_replicas=3, rank=0)
