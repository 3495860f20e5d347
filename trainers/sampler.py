"""Data order that depends only on (seed, step): resuming at step s continues exactly where a
straight run would be, and N processes together see the global batch one process would."""
from __future__ import annotations

import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers (e.g. seed, step, sample index), so that random
    choices for a sample do not depend on how the batch is split across processes."""
    h = 0x2545F4914F6CDD1D
    for k in keys:
        h = (h * 6364136223846793005 + int(k) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(h)


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: for steps start_step, start_step+1, ..., the dataset indices of this rank's
    share of the global batch, each as (global sample position, dataset index) pairs.

    Each epoch is a fresh permutation drawn from (seed, epoch); the incomplete last batch of an
    epoch is dropped. `num_steps` bounds the iteration (None: endless).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, num_steps: int | None = None):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        if num_items < batch_size:
            raise ValueError(f"the dataset has {num_items} objects, fewer than batch_size {batch_size}")
        self.n, self.b, self.seed, self.start = num_items, batch_size, seed, start_step
        self.rank, self.world, self.num_steps = rank, world_size, num_steps
        self.steps_per_epoch = num_items // batch_size

    def indices(self, step: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch)).tolist()
        per_rank = self.b // self.world
        first = pos * self.b + self.rank * per_rank
        return [(step * self.b + self.rank * per_rank + i, perm[first + i]) for i in range(per_rank)]

    def __iter__(self):
        step = self.start
        while self.num_steps is None or step < self.start + self.num_steps:
            yield self.indices(step)
            step += 1

    def __len__(self):
        if self.num_steps is None:
            raise TypeError("endless sampler")
        return self.num_steps


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset for StepBatches: takes its (global sample position, dataset index) pairs and
    returns the item with its position as "pos" (which seeds that sample's random choices)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        pos, i = item
        return {**self.ds[i], "pos": pos}
