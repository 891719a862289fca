"""The engine interface the training loop talks to, and mixed precision (``Precision``).

The loop never asks which engine it runs on. It calls, per run: ``setup`` (process group, device,
precision), ``wrap`` (the module to train through: DDP or the engine's own wrapper), ``unwrap``
(the raw module, for evaluation and saving), ``teardown``; per step: ``autocast``, ``backward``,
``optimizer_step`` (GradScaler unscale, clipping, step, update); and ``no_sync`` around the
micro-batches of an accumulation step whose gradients must not be all-reduced yet.

This base class is the DDP behaviour without DDP-specific wrapping; ``ddp.py`` adds the wrapper,
``accelerate.py`` hands the same calls to ``accelerate.Accelerator``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .. import dist
from ..config import TrainConfig
from ..dist import DistEnv
from ..errors import UserError


# ----------------------------------------------------------------------------- precision
@dataclass
class Precision:
    name: str  # "bf16", "fp16" or "off" after resolving "auto"
    device: torch.device
    scaler: torch.amp.GradScaler  # enabled only for fp16

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA devices that support it, else fp16 + GradScaler; off on the CPU."""
    if mode == "auto":
        if device.type == "cuda":
            # native bf16 only (Ampere and newer): V100/T4 "support" it by emulation, slower than fp16
            mode = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            mode = "off"
    if mode == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or off")
    scaler = torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))
    return Precision(mode, device, scaler)


# ----------------------------------------------------------------------------- the interface
def strip_wrappers(module: nn.Module) -> nn.Module:
    """The raw module inside torch.compile's and DDP's wrappers (in any nesting)."""
    while True:
        if hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


class Engine:
    """One run's engine. Subclasses set ``name`` and implement ``setup`` (and ``wrap`` when they wrap)."""

    name = "base"

    def __init__(self, cfg: TrainConfig, env: DistEnv, precision: Precision) -> None:
        self.cfg, self.env, self.precision = cfg, env, precision
        # fp16: optimizer steps the GradScaler skipped (inf/NaN gradients), counted on the device
        self.skipped_steps = torch.zeros(1, dtype=torch.int64, device=env.device)

    @classmethod
    def setup(cls, cfg: TrainConfig) -> "Engine":
        """Join the process group (under a launcher), pick the device and the precision."""
        raise NotImplementedError

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (``model`` is already on ``env.device``)."""
        return model

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        """The raw module behind ``wrapped``: evaluation, checkpoints and weights use it."""
        return strip_wrappers(wrapped)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
                       grad_clip: float) -> None:
        """Unscale (fp16), clip the true gradients (never the scaled ones), step, update the scale.

        With fp16 the scaler skips steps whose gradients hold inf/NaN. A fused optimizer (CUDA) gets
        the inf flag as a tensor and skips inside its kernel, so no host read; the skip is counted in
        ``skipped_steps`` on the device (the scale drops exactly on a skipped step), for the loop to
        take those steps back from the LR schedule.
        """
        scaler = self.precision.scaler
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        if not scaler.is_enabled():
            scaler.step(optimizer)  # a plain optimizer.step()
            return
        before = scaler._get_scale_async().clone()  # device tensors only: no host sync
        scaler.step(optimizer)
        scaler.update()
        self.skipped_steps += (scaler._get_scale_async() < before).to(torch.int64)

    def no_sync(self, wrapped: nn.Module) -> contextlib.AbstractContextManager:
        """Backward passes inside skip the gradient all_reduce (all but the last micro-batch)."""
        inner: Any = wrapped._orig_mod if hasattr(wrapped, "_orig_mod") else wrapped
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            return inner.no_sync()
        return contextlib.nullcontext()

    def teardown(self) -> None:
        dist.teardown()
