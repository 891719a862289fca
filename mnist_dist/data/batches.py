"""Which images each rank trains on, in which order, and which it evaluates.

Training order always comes from ``torch.utils.data.DistributedSampler`` (shuffle, seed,
``set_epoch``, ``drop_last``), whichever input path is used, so ranks see disjoint shards and
the two paths (``tensor``: the dataset held on the device; ``dataloader``: the classic per-sample
pipeline) give the same batches in the same order. Evaluation uses contiguous, disjoint, unpadded
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

import json
import os
from dataclasses import dataclass
from typing import Iterator, TextIO

import torch
from torch.utils.data import DistributedSampler

from ..dist import DistEnv
from .mnist import classic_transform

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


INDEX_LOG_ENV = "MNIST_DIST_INDEX_LOG"  # tests only: PATH -> every batch's sample indices in PATH.rank<R>


def index_log(env: DistEnv) -> TextIO | None:
    """For the tests that prove every training index is used once per epoch across a resume."""
    path = os.environ.get(INDEX_LOG_ENV)
    return open(f"{path}.rank{env.rank}", "a") if path else None


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
        log = index_log(self.env)
        for step in range(start_step, len(self)):
            idx = order[step * b:(step + 1) * b]
            if log is not None:  # tests only (a host sync per batch)
                log.write(json.dumps({"epoch": epoch, "step": step, "indices": idx.tolist()}) + "\n")
                log.flush()
            yield self.images[idx], self.labels[idx]


class _SkipSampler(torch.utils.data.Sampler):
    """A DistributedSampler's order with the first ``skip`` indices removed (mid-epoch resume)."""

    def __init__(self, sampler: DistributedSampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


@dataclass
class LoaderBatches:
    """The classic path: torchvision MNIST + ToTensor/Normalize + DataLoader + DistributedSampler."""

    root: str
    normalize: bool
    env: DistEnv
    per_rank_batch: int
    seed: int
    num_workers: int

    def __post_init__(self) -> None:
        from torchvision.datasets import MNIST

        self.dataset = MNIST(self.root, train=True, download=False,
                             transform=classic_transform(self.normalize))

    def __len__(self) -> int:
        return steps_per_epoch(len(self.dataset), self.env.world_size, self.per_rank_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        sampler = train_sampler(len(self.dataset), self.env, self.seed, epoch)
        order = _SkipSampler(sampler, start_step * self.per_rank_batch) if start_step else sampler
        loader = DataLoader(
            self.dataset, batch_size=self.per_rank_batch, sampler=order, drop_last=True,
            num_workers=self.num_workers, pin_memory=self.env.device.type == "cuda",
            persistent_workers=False,
        )
        non_blocking = self.env.device.type == "cuda"
        for x, y in loader:
            yield x.to(self.env.device, non_blocking=non_blocking), y.to(self.env.device, non_blocking=non_blocking)
