"""The data order of training: a pure function of (seed, step).

Sample position ``p = step * batch_size + j`` is item ``perm_e[p mod n]`` of epoch ``e = p // n``,
where ``perm_e`` is ``torch.randperm`` under a generator seeded from (seed, e); items are augmented
as a function of (seed, epoch, index) (:mod:`vitsplit.data.dataset`). One global batch per step is
split into ``grad_accum * world_size`` micro-batches (micro-batch ``a`` of rank ``r`` is slice
``a * world + r``), so the images of a step do not depend on the number of processes.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of ``epoch``: ``torch.randperm(n)`` under a generator seeded from (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0]))
    return torch.randperm(n, generator=g)


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of (index, epoch) pairs for this rank, for steps ``start .. iters-1``."""

    def __init__(
        self, n: int, seed: int, batch_size: int, grad_accum: int, rank: int, world: int, start: int, iters: int
    ):
        self.n, self.seed, self.batch, self.accum = n, seed, batch_size, grad_accum
        self.rank, self.world, self.start, self.iters = rank, world, start, iters
        self.micro = batch_size // (grad_accum * world)
        self._perms: dict[int, torch.Tensor] = {}

    def step_items(self, step: int) -> list[tuple[int, int]]:
        """All (index, epoch) of the global batch of ``step``."""
        out = []
        for p in range(step * self.batch, (step + 1) * self.batch):
            e = p // self.n
            if e not in self._perms:
                self._perms = {e: epoch_permutation(self.seed, e, self.n)}
            out.append((int(self._perms[e][p % self.n]), e))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.iters):
            items = self.step_items(step)
            for a in range(self.accum):
                k = a * self.world + self.rank
                yield items[k * self.micro : (k + 1) * self.micro]

    def __len__(self) -> int:
        return (self.iters - self.start) * self.accum


class EpochItems(torch.utils.data.Dataset):
    """dataset[(index, epoch)] -> the item as augmented in that epoch."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        if hasattr(self.dataset, "get"):
            return self.dataset.get(index, epoch)
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)
