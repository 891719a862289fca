"""Plain nn.Modules. Nothing here knows about ranks, devices or process groups."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import UserError


class SeedCNN(nn.Sequential):
    """The original notebook's network, layer for layer.

    Three 3x3 convolutions (32, 16, 8 channels, no padding) with ReLU, one 2x2 max-pool,
    then Linear 968 -> 512 -> 128 -> 10 with no activation between the linear layers.
    """

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 32, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Conv2d(32, 16, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Conv2d(16, 8, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(968, 512),
            nn.Linear(512, 128),
            nn.Linear(128, 10),
        )


class FastCNN(nn.Sequential):
    """Our default: two 5x5 convolutions and one hidden layer; >= 99% after one epoch in ~5 s on 2 cores."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )


def _conv_bn(c_in: int, c_out: int, kernel: int, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class BestCNN(nn.Sequential):
    """The ``best-v1`` recipe's network (the previous ``--recipe best``): three conv +
    BatchNorm blocks, ~3 M multiply-adds per image. Kept so that runs trained with it still load.

    conv 32@5x5 -> BN -> ReLU -> pool -> conv 48@3x3 (pad 1) -> BN -> ReLU -> pool -> conv 96@3x3 ->
    BN -> ReLU -> 96x4x4 -> FC 10.
    """

    def __init__(self) -> None:
        super().__init__(
            *_conv_bn(1, 32, 5),
            nn.MaxPool2d(2),
            *_conv_bn(32, 48, 3, padding=1),
            nn.MaxPool2d(2),
            *_conv_bn(48, 96, 3),
            nn.Flatten(),
            nn.Linear(96 * 4 * 4, 10),
        )


class PoolFirstCNN(nn.Sequential):
    """The ``best`` recipe's network: BestCNN with each max-pool moved before its BatchNorm and ReLU
    (conv -> pool -> BN -> ReLU, the order airbench uses) and wider, ~4.3 M multiply-adds per image.

    conv 32@5x5 -> pool -> BN -> ReLU -> conv 64@3x3 (pad 1) -> pool -> BN -> ReLU -> conv 128@3x3 ->
    BN -> ReLU -> 128x4x4 -> FC 10.

    Pooling first, BatchNorm and ReLU of the first two blocks work on a quarter of the values. With
    ``--channels-last``, which the recipe sets (the CPU's max-pool is several times faster on
    channels_last tensors), an epoch takes ~12 s of a 2-core CPU: as long as BestCNN's in
    channels_last and less than its ~17 s in NCHW, with 1.4x its multiply-adds
    (``benchmarks/cpu_layers.py``). Under DDP its BatchNorm layers stay per-rank, their running
    statistics averaged before evaluation; ``--sync-bn`` converts them to SyncBatchNorm on CUDA
    (``Engine.prepare``).
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        c1, c2, c3 = widths
        super().__init__(
            nn.Conv2d(1, c1, 5, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c2), nn.ReLU(),
            *_conv_bn(c2, c3, 3),
            nn.Flatten(),
            nn.Linear(c3 * 4 * 4, 10),
        )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "seed": SeedCNN,
    "fast": FastCNN,
    "best": BestCNN,
    "best2": PoolFirstCNN,
}


def check_model(name: str) -> None:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")


def build_model(name: str) -> nn.Module:
    return MODELS[name]()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any nesting."""
    prefixes = ("module.", "_orig_mod.")
    cleaned = {}
    for key, value in state.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned
