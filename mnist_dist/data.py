"""MNIST: finding, validating and downloading the files; device-resident tensors; rank shards.

Training order always comes from ``torch.utils.data.DistributedSampler`` (shuffle, seed,
``set_epoch``, ``drop_last``), whichever input path is used, so ranks see disjoint shards and
the two paths (``tensor`` and ``dataloader``) give the same batches in the same order.
Evaluation uses contiguous, disjoint, unpadded shards instead (see ``eval_shard``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .dist import DistEnv, main_process_first
from .errors import UserError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IMAGE_SIDE = 28
NUM_CLASSES = 10

# file name -> (IDX magic number, number of items) in torchvision's MNIST/raw layout
IDX_FILES = {
    "train-images-idx3-ubyte": (2051, 60000),
    "train-labels-idx1-ubyte": (2049, 60000),
    "t10k-images-idx3-ubyte": (2051, 10000),
    "t10k-labels-idx1-ubyte": (2049, 10000),
}
DATA_DIR_ENV = "MNIST_DATA_DIR"


def resolve_data_dir(flag: str | None) -> str:
    """--data-dir, else $MNIST_DATA_DIR, else ./data (torchvision root: files in ROOT/MNIST/raw)."""
    return flag or os.environ.get(DATA_DIR_ENV) or "./data"


def raw_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "MNIST" / "raw"


def missing_files(root: str | os.PathLike) -> list[str]:
    return [name for name in IDX_FILES if not (raw_dir(root) / name).is_file()]


def check_idx_file(path: Path, magic: int, count: int | None = None) -> int:
    """Validate an IDX header and size; return the item count. Raises UserError, never crashes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header = fh.read(16 if magic == 2051 else 8)
    except OSError as exc:
        raise UserError(f"cannot read MNIST file {path}: {exc.strerror}") from None
    need = 16 if magic == 2051 else 8
    if len(header) < need:
        raise UserError(f"corrupt MNIST file {path}: {size} bytes is shorter than an IDX header")
    found = int.from_bytes(header[0:4], "big")
    if found != magic:
        raise UserError(
            f"corrupt MNIST file {path}: magic number {found} (expected {magic}); "
            f"delete it and download again"
        )
    n = int.from_bytes(header[4:8], "big")
    expected_size = 8 + n
    if magic == 2051:
        rows, cols = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
            raise UserError(f"corrupt MNIST file {path}: images are {rows}x{cols}, expected 28x28")
        expected_size = 16 + n * rows * cols
    if size != expected_size:
        raise UserError(
            f"corrupt or truncated MNIST file {path}: {size} bytes, expected {expected_size} "
            f"for {n} items; delete it and download again"
        )
    if count is not None and n != count:
        raise UserError(f"unexpected MNIST file {path}: {n} items, expected {count}")
    return n


def validate_files(root: str | os.PathLike, exact_counts: bool = True) -> None:
    for name, (magic, count) in IDX_FILES.items():
        check_idx_file(raw_dir(root) / name, magic, count if exact_counts else None)


def download(root: str | os.PathLike) -> None:
    """Download MNIST with torchvision into ROOT/MNIST/raw (no-op when already complete)."""
    from filelock import FileLock, Timeout
    from torchvision.datasets import MNIST

    target = raw_dir(root)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create data directory {target}: {exc.strerror}") from None
    try:
        # The lock serialises nodes that share a filesystem; within a node only local rank 0 gets here.
        with FileLock(str(target.parent / ".download.lock"), timeout=1800):
            if missing_files(root):
                for train in (True, False):
                    MNIST(str(root), train=train, download=True)
    except Timeout:
        raise UserError(f"timed out waiting for another process to download MNIST into {target}") from None
    except UserError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError on no network
        reason = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise UserError(
            f"MNIST is not in {target} and downloading it failed ({reason}). "
            f"On a machine with internet run `python -m mnist_dist download --data-dir {root}`, "
            f"or copy the four IDX files there, then point --data-dir / ${DATA_DIR_ENV} at it"
        ) from None


def prepare(root: str, env: DistEnv, allow_download: bool) -> None:
    """Make sure the files exist and are sane. One process per node downloads; others wait."""
    with main_process_first(env, local=True):
        if env.is_local_main and missing_files(root):
            if not allow_download:
                raise_missing(root)
            download(root)
    if missing_files(root):
        raise_missing(root)
    validate_files(root)


def raise_missing(root: str) -> None:
    raise UserError(
        f"MNIST files missing in {raw_dir(root)} ({', '.join(missing_files(root))}); "
        f"run `python -m mnist_dist download --data-dir {root}` where there is internet, "
        f"or set --data-dir / ${DATA_DIR_ENV} to a directory holding MNIST/raw"
    )


def load_split(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N], read by torchvision's MNIST."""
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root, train=train, download=False)
    except Exception as exc:
        raise UserError(f"cannot load MNIST from {raw_dir(root)}: {exc}") from None
    images, labels = ds.data, ds.targets.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UserError(f"corrupt MNIST labels in {raw_dir(root)}: values outside 0..9")
    return images, labels


def to_float(images_u8: torch.Tensor, normalize: bool) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28], bit-identical to ToTensor (+ Normalize)."""
    from torchvision.transforms import functional as TF

    x = images_u8.unsqueeze(1).to(torch.float32).div(255)
    if normalize:
        x = TF.normalize(x, [MNIST_MEAN], [MNIST_STD])
    return x


def classic_transform(normalize: bool):
    from torchvision import transforms

    steps = [transforms.ToTensor()]
    if normalize:
        steps.append(transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)))
    return transforms.Compose(steps)


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
    return (n // world_size) // per_rank_batch


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
