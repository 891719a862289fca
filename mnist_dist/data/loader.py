"""The classic input path (``--loader dataloader``): torchvision's MNIST dataset, ToTensor (+ Normalize)
per sample, a ``DataLoader`` with workers, in ``DistributedSampler``'s order — the same batches in the
same order as the device-resident default (``batches.TensorBatches``), only slower."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DistributedSampler

from ..dist import DistEnv
from ..errors import UserError
from .batches import steps_per_epoch, train_sampler
from .mnist import MNIST_MEAN, MNIST_STD


def classic_transform(normalize: bool):
    """ToTensor (+ Normalize): the notebook's per-sample pipeline, for ``--loader dataloader``."""
    from torchvision import transforms

    steps = [transforms.ToTensor()]
    if normalize:
        steps.append(transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)))
    return transforms.Compose(steps)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals every process of a job (SLURM's preemption
    TERM, ``docker stop``, Ctrl-C's process group), workers included. The rank handles the signal
    (stopping.py: agree, checkpoint, exit) and then shuts its workers down; a worker killed by it
    first would make the rank's next batch raise instead."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


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
        try:
            from torchvision.datasets import MNIST
        except Exception as exc:  # not installed, or built for another torch
            raise UserError(f"--loader dataloader needs torchvision, which does not import here "
                            f"({type(exc).__name__}); use the default --loader tensor") from None

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
            persistent_workers=False, worker_init_fn=ignore_stop_signals if self.num_workers else None,
        )
        non_blocking = self.env.device.type == "cuda"
        for x, y in loader:
            yield x.to(self.env.device, non_blocking=non_blocking), y.to(self.env.device, non_blocking=non_blocking)
