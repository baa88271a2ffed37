"""Length-grouped batches (data.group_by_length): HF's grouping, the same global batches on every worker and world
size, a new order each epoch, every example at most once, and far less padding than random batches."""

import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from flatray.data.sampling import LengthGroupedSampler

LENGTHS = torch.randint(5, 65, (1000,), generator=torch.Generator().manual_seed(0)).tolist()


def batches_of(world, batch_size=32, seed=3, epoch=0):
    """The global batches the workers of a world see together, from a DataLoader per rank."""
    per_rank = []
    for rank in range(world):
        sampler = LengthGroupedSampler(LENGTHS, batch_size, world, rank, seed)
        sampler.set_epoch(epoch)
        per_rank.append([b.tolist() for b in DataLoader(range(len(LENGTHS)), batch_size=batch_size // world,
                                                         sampler=sampler, drop_last=True)])
    assert len({len(r) for r in per_rank}) == 1
    return [sum((r[i] for r in per_rank), []) for i in range(len(per_rank[0]))]


def test_the_batches_are_hf_length_grouped_batches_shuffled_with_the_longest_first():
    sampler = LengthGroupedSampler(LENGTHS, 32, seed=3)
    g = torch.Generator().manual_seed(3 * 1_000_003)
    hf = get_length_grouped_indices(LENGTHS, 32, generator=g)  # the reference: HF's order, same generator state
    hf_batches = [hf[i:i + 32] for i in range(0, len(hf) - 31, 32)]
    ours = sampler.global_batches()
    assert sorted(map(sorted, ours)) == sorted(map(sorted, hf_batches))  # the same batches ...
    assert ours != hf_batches and ours[0] == hf_batches[0]  # ... shuffled, the longest example's batch first
    assert max(LENGTHS) == LENGTHS[hf[0]] and hf[0] in ours[0]


def test_every_world_size_sees_the_same_global_batches_each_example_once():
    one, two, four = batches_of(1), batches_of(2), batches_of(4)
    assert one == two == four
    flat = sum(one, [])
    assert len(flat) == len(set(flat)) == len(LENGTHS) // 32 * 32
    assert batches_of(2, epoch=1) != one and batches_of(2, seed=4) != one and batches_of(2) == two


def test_grouped_batches_pad_far_less_than_random_ones():
    def padded(batches):  # tokens after padding each batch to its longest member / real tokens
        return sum(len(b) * max(LENGTHS[i] for i in b) for b in batches) / sum(LENGTHS[i] for b in batches for i in b)

    grouped = padded(batches_of(1))
    random_order = list(DistributedSampler(range(len(LENGTHS)), num_replicas=1, rank=0, shuffle=True, seed=3))
    plain = padded([random_order[i:i + 32] for i in range(0, len(random_order) - 31, 32)])
    # uniform lengths 5..64: a random batch pads to ~62 for a mean of ~35; megabatches of 7 batches here: 1.13
    assert grouped < 1.2 < 1.6 < plain
