"""Which images each rank trains on, in which order, and which it evaluates.

Training order always comes from ``torch.utils.data.DistributedSampler`` (shuffle, seed,
``set_epoch``, ``drop_last``), whichever input path is used, so ranks see disjoint shards and
the two paths (``tensor``: the dataset held on the device, here; ``dataloader``: the classic
per-sample pipeline, ``loader.py``) give the same batches in the same order. Evaluation uses contiguous, disjoint, unpadded
shards instead (``eval_shard``), so every test image counts exactly once at any world size.

The data position is independent of the world size: an epoch's order is one permutation of the
training set (seeded with seed + epoch), and with ``DistributedSampler``'s interleaved slices global
batch j of B images is exactly positions [j*B, (j+1)*B) of that permutation at EVERY world size
(rank r takes positions j*B + r + k*W, k < B/W). So "optimizer steps done in this epoch" is a
position any world size can resume from. Each epoch uses floor(N / B) global batches; the remaining
N mod B images of that epoch's permutation (96 of 60,000 at B = 256) are left out (``drop_last``), the
same ones at every world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DistributedSampler

from ..dist import DistEnv


def train_sampler(n: int, env: DistEnv, seed: int, epoch: int) -> DistributedSampler:
    sampler = DistributedSampler(
        range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return sampler


def rank_indices(n: int, env: DistEnv, seed: int, epoch: int) -> torch.Tensor:
    """This rank's sample order for ``epoch`` (disjoint from every other rank's)."""
    return torch.tensor(list(train_sampler(n, env, seed, epoch)), dtype=torch.long)


def steps_per_epoch(n: int, world_size: int, per_rank_batch: int) -> int:
    """Global batches per epoch: floor(N / B) with B = per-rank batch x world size (the same as
    DistributedSampler's floor(floor(N / W) / (B / W)), at every world size)."""
    return n // (world_size * per_rank_batch)


def eval_shard(n: int, rank: int, world_size: int) -> slice:
    """Contiguous, disjoint, unpadded shard: the union over ranks is exactly range(n)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


@dataclass
class TensorBatches:
    """The whole training set on the training device; batches are cut by indexing."""

    images: torch.Tensor  # float [N, 1, 28, 28] on the device
    labels: torch.Tensor  # int64 [N] on the device
    env: DistEnv
    per_rank_batch: int
    seed: int

    def __len__(self) -> int:
        return steps_per_epoch(len(self.labels), self.env.world_size, self.per_rank_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = rank_indices(len(self.labels), self.env, self.seed, epoch).to(self.images.device)
        b = self.per_rank_batch
        for step in range(start_step, len(self)):
            idx = order[step * b:(step + 1) * b]
            yield self.images[idx], self.labels[idx]
