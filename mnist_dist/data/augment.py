"""On-device batch augmentation (and the channels_last layout of input batches).

``BatchTransform``: random rotation / shift / zoom of a whole batch tensor with one ``affine_grid`` +
``grid_sample`` on the device (no per-sample PIL). The random parameters of an epoch come from a
``torch.Generator`` seeded from (seed, rank, epoch), drawn for the whole epoch at once and sliced by
step: a run resumed at any step sees exactly the same augmented batches. Nothing here reads the
device inside a training step: no ``.item()``, no host copies.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..dist import DistEnv
from .mnist import IMAGE_SIDE, MNIST_MEAN, MNIST_STD


def augment_seed(seed: int, rank: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, rank, epoch); distinct triples never collide by addition."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(2, dtype=np.uint64)[0] >> 1)


def affine_matrices(params: torch.Tensor, degrees: float, shift_px: float, scale: float) -> torch.Tensor:
    """[B, 4] uniform(-1, 1) draws -> [B, 2, 3] affine_grid matrices (rotate, zoom, shift)."""
    angle = params[:, 0] * math.radians(degrees)
    zoom = 1.0 + params[:, 1] * scale
    shift = params[:, 2:4] * (2.0 * shift_px / IMAGE_SIDE)  # pixels -> normalised [-1, 1] coordinates
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack([
        torch.stack([cos, -sin, shift[:, 0]], dim=1),
        torch.stack([sin, cos, shift[:, 1]], dim=1),
    ], dim=1)


def augment_batch(x: torch.Tensor, params: torch.Tensor, degrees: float, shift_px: float, scale: float,
                  background: float) -> torch.Tensor:
    """Rotate/zoom/shift every image of ``x`` [B, C, H, W] by its own row of ``params``.

    Shape, dtype and device are kept; areas moved in from outside take the background value.
    """
    theta = affine_matrices(params.to(torch.float32), degrees, shift_px, scale)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float() - background, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) + background
    return out.to(x.dtype)


class BatchTransform:
    """Applied to each training batch by the Trainer: augmentation and/or channels_last."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, per_rank_batch: int, steps_per_epoch: int) -> None:
        self.cfg, self.env = cfg, env
        self.per_rank_batch, self.steps_per_epoch = per_rank_batch, steps_per_epoch
        self.background = -MNIST_MEAN / MNIST_STD if cfg.normalize else 0.0
        self._epoch: int | None = None
        self._params: torch.Tensor | None = None

    def epoch_params(self, epoch: int) -> torch.Tensor:
        """[steps * batch, 4] uniform(-1, 1) draws for this rank and epoch (cached per epoch)."""
        if self._epoch != epoch or self._params is None:
            device = self.env.device
            g = torch.Generator(device=device)
            g.manual_seed(augment_seed(self.cfg.seed, self.env.rank, epoch))
            n = self.steps_per_epoch * self.per_rank_batch
            self._params = torch.rand(n, 4, generator=g, device=device) * 2 - 1
            self._epoch = epoch
        return self._params

    def __call__(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if self.cfg.augment:
            b = self.per_rank_batch
            params = self.epoch_params(epoch)[step * b: step * b + x.shape[0]]
            x = augment_batch(x, params, self.cfg.aug_degrees, self.cfg.aug_shift, self.cfg.aug_scale,
                              self.background)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
