"""Preparing a plain model for the engine: BatchNorm handling, memory format, cuDNN, compilation.

* ``prepare_model``: BatchNorm -> SyncBatchNorm under a process group on CUDA, channels_last,
  cuDNN autotune. On the CPU (gloo) DDP refuses SyncBatchNorm ("SyncBatchNorm layers only work with
  GPU modules", torch 2.14), so BatchNorm stays per rank and ``average_buffers`` makes the running
  statistics identical on every rank before each evaluation (exact eval, identical saved weights).
* ``compile_model``: ``torch.compile`` of the training module (the DDP wrapper when there is one).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from ..dist import DistEnv, all_reduce_sum
from ..errors import UserError

CUDA_GRAPH_MODES = ("reduce-overhead",)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def prepare_model(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """SyncBatchNorm (process group on CUDA), channels_last, cuDNN autotune. Before the engine wraps it."""
    if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and env.device.type != "cuda":
        raise UserError(f"--compile-mode {cfg.compile_mode} uses CUDA graphs and needs a CUDA device; "
                        f"on the CPU use --compile-mode default")
    if cfg.sync_bn and env.distributed and env.device.type == "cuda" and has_batchnorm(model):
        # Batch statistics over the GLOBAL batch: every rank normalises with the same mean/var,
        # so N ranks x B/N behave like one rank x B. Works with gloo on the CPU and NCCL on CUDA.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.cudnn_benchmark and env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


@torch.no_grad()
def average_buffers(model: nn.Module, env: DistEnv) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over ranks, in place.

    Per-rank BatchNorm (the CPU path) updates its running statistics from the local batch after
    DDP's start-of-forward broadcast, so ranks end an epoch with different statistics. Averaging
    them before evaluation gives every rank the same model (statistics of all ranks' batches).
    One all_reduce of a flat tensor; a no-op without a process group or floating buffers.
    """
    if not env.distributed:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    all_reduce_sum(flat, env)
    flat /= env.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset: offset + b.numel()].view_as(b))
        offset += b.numel()


def compile_model(module: nn.Module, cfg: TrainConfig) -> nn.Module:
    """torch.compile the module the training step calls (DDP(model) or model); eval stays eager."""
    if not cfg.compile:
        return module
    return torch.compile(module, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def uses_sync_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
