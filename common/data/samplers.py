"""Rank-aware samplers: weighted sampling with replacement that DDP shards instead of repeating."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

__all__ = ["DistributedWeightedSampler"]


class DistributedWeightedSampler(DistributedSampler):
    """``WeightedRandomSampler`` (with replacement) split across DDP ranks.

    Every rank draws the same ``num_samples`` indices of the epoch from ``(seed, epoch)`` and keeps
    ``rank::num_replicas`` of them, so the ranks together see exactly the draw one process would make
    and none repeats another's work. It is a ``DistributedSampler``, so MONAI's engines call
    ``set_epoch`` at every epoch start. Without a process group it is a seeded weighted sampler.

    Args:
        weights: one non-negative weight per dataset item (e.g. uniform over source datasets).
        num_samples: draws per epoch over all ranks (default: the dataset length).
        num_replicas, rank: default to the running process group (1 and 0 without one).
        seed: base seed, shared by all ranks.
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        weights = torch.as_tensor(weights, dtype=torch.double)
        if weights.ndim != 1 or len(weights) == 0 or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be a non-empty 1D sequence of non-negative numbers with a positive sum.")
        running = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(
            range(len(weights)),
            num_replicas=num_replicas if num_replicas is not None or running else 1,
            rank=rank if rank is not None or running else 0,
            shuffle=True,
            seed=seed,
        )
        self.weights = weights
        self.total_draws = int(num_samples) if num_samples is not None else len(weights)
        self.num_samples = -(-self.total_draws // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(draws[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
