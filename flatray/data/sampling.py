"""Length-grouped batches (data.group_by_length): batches of examples of similar length, so that padding each batch
to its longest member wastes little. Real text varies a lot in length (rotten-tomatoes: 5 to 64+ tokens), and a
random batch of 32 is padded to nearly its longest member.

The order is Hugging Face's (`get_length_grouped_indices`, what the Trainer's `group_by_length` uses): a random
permutation cut into megabatches of up to 50 batches, each sorted by length. The batches it makes are then shuffled
(HF keeps each megabatch's batches in length order), except the first, which holds the longest example, so a batch
too big for memory fails at the first step. Everything is drawn from a generator seeded with (seed, epoch): every
worker computes the same global batches, and worker r takes the r-th slice of each (as DistributedSampler splits
the data, a global batch is the same whatever the world size).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """This worker's indices of the length-grouped global batches of `batch_size` (full batches only), in an order
    that changes with `set_epoch` (called by the epoch loop, as for DistributedSampler)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} workers")
        self.lengths, self.batch_size, self.world, self.rank, self.seed = list(lengths), batch_size, world, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches, each a list of example indices (every worker computes the same)."""
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=g)
        n, b = len(order) // self.batch_size, self.batch_size
        batches = [order[i * b:(i + 1) * b] for i in range(n)]
        if not batches:
            return []
        # HF's order starts with the longest example's batch: it stays first, so a batch too big fails at step 1
        rest = batches[1:]
        return [batches[0]] + [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        share = self.batch_size // self.world
        for batch in self.global_batches():
            yield from batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size * (self.batch_size // self.world)
