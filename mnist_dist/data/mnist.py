"""MNIST files: finding, validating, downloading and reading them (torchvision's ``MNIST/raw`` layout).

Reading is our own IDX parser (the same bytes torchvision reads, bit for bit), so the default
tensor path never imports torchvision (~2 s here); only downloading and ``--loader dataloader`` do.
Importing this module imports neither torch nor torchvision (``read_split`` is NumPy only, for the
pictures process); the functions that return tensors import torch when they run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..dist import DistEnv

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
# "1": accept IDX files with other item counts than 60,000/10,000 (a subset of MNIST: quick checks, the
# tests' small data); the default is strict, so a truncated download is never mistaken for a subset
SUBSET_ENV = "MNIST_DIST_ALLOW_SUBSET"


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
        raise UserError(f"unexpected MNIST file {path}: {n} items, expected {count} "
                        f"(a subset on purpose? set {SUBSET_ENV}=1)")
    return n


def validate_files(root: str | os.PathLike, exact_counts: bool | None = None) -> None:
    """Every IDX file's header and size; the item counts too unless ``$MNIST_DIST_ALLOW_SUBSET=1``."""
    if exact_counts is None:
        exact_counts = os.environ.get(SUBSET_ENV) != "1"
    for name, (magic, count) in IDX_FILES.items():
        check_idx_file(raw_dir(root) / name, magic, count if exact_counts else None)


def download(root: str | os.PathLike) -> None:
    """Download MNIST with torchvision into ROOT/MNIST/raw (no-op when already complete)."""
    if not missing_files(root):
        return  # complete: torchvision is only needed to fetch files (an image may not carry it)
    from filelock import FileLock, Timeout

    try:
        from torchvision.datasets import MNIST
    except Exception as exc:  # not installed, or built for another torch
        raise UserError(
            f"MNIST is not in {raw_dir(root)} and downloading it needs torchvision, which does not import "
            f"here ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); copy the four IDX files "
            f"there, or download them where torchvision works"
        ) from None
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
    from ..dist import main_process_first

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


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file's items as uint8: [N, 28, 28] images or [N] labels (header checked first)."""
    n = check_idx_file(path, magic)
    offset = 16 if magic == 2051 else 8
    try:
        items = np.frombuffer(bytearray(path.read_bytes()[offset:]), dtype=np.uint8)  # writable copy
    except OSError as exc:
        raise UserError(f"cannot read MNIST file {path}: {exc.strerror}") from None
    return items.reshape(n, IMAGE_SIDE, IMAGE_SIDE) if magic == 2051 else items


def read_split(root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and uint8 labels [N] of one split, checked; NumPy only."""
    prefix = "train" if train else "t10k"
    folder = raw_dir(root)
    missing = [name for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
               if not (folder / name).is_file()]
    if missing:
        raise UserError(f"cannot load MNIST from {folder}: missing {', '.join(missing)}")
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte", 2051)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte", 2049)
    if len(images) != len(labels):
        raise UserError(f"corrupt MNIST files in {folder}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise UserError(f"corrupt MNIST labels in {folder}: values outside 0..9")
    return images, labels


def load_split(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N], as torchvision's MNIST reads them."""
    import torch

    images, labels = read_split(root, train)
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def to_float(images_u8: torch.Tensor, normalize: bool) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28], bit-identical to ToTensor (+ Normalize)."""
    import torch

    x = images_u8.unsqueeze(1).to(torch.float32).div(255)
    if normalize:  # torchvision's Normalize: float32 tensors, subtract, then divide
        mean = torch.tensor([MNIST_MEAN], dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor([MNIST_STD], dtype=torch.float32, device=x.device).view(-1, 1, 1)
        x = x.sub(mean).div(std)
    return x
