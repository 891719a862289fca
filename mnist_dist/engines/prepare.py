"""Preparing a plain model for the engine: BatchNorm handling, memory format, cuDNN, compilation.

* ``prepare_model``: channels_last, cuDNN autotune, and — only with ``--sync-bn`` — BatchNorm ->
  SyncBatchNorm under a process group on CUDA. SyncBatchNorm is not sync-free (mask indexing and a
  blocking all_gather in every BN layer: host syncs every step; Dynamo graph-breaks on it), and on
  the CPU DDP refuses it ("SyncBatchNorm layers only work with GPU modules", torch 2.14). So by
  default BatchNorm stays per rank everywhere and ``average_buffers`` makes the running statistics
  identical on every rank before each evaluation (exact eval, identical saved weights).
* ``compile_model``: ``torch.compile`` of the training module (the DDP wrapper when there is one).
* ``configure_torch``: process-wide settings before the model exists: ``--deterministic``, TF32 for
  fp32 matmuls/convolutions on CUDA when AMP is off, Inductor's compile workers per rank.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import TrainConfig
from ..dist import DistEnv, all_reduce_sum, default_threads
from ..errors import UserError

CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS workspace setting that makes its kernels deterministic


def configure_torch(cfg: TrainConfig, env: DistEnv, amp: str) -> None:
    """Process-wide torch settings; call before the model is built and before the first cuBLAS call."""
    if cfg.deterministic:
        # cuBLAS reads this when its handle is created (the first matmul), so setting it here works
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        # warn_only: an op without a deterministic kernel warns (naming itself) instead of failing the run
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if env.device.type == "cuda" and amp == "off":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    if cfg.compile:
        # Inductor starts one compile worker per core by default, in EVERY rank: N ranks x cores workers
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(default_threads(env.local_world_size)))
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # both capture CUDA graphs


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def prepare_model(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """SyncBatchNorm (process group on CUDA), channels_last, cuDNN autotune. Before the engine wraps it."""
    if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and env.device.type != "cuda":
        raise UserError(f"--compile-mode {cfg.compile_mode} uses CUDA graphs and needs a CUDA device; "
                        f"on the CPU use --compile-mode default")
    if cfg.sync_bn and env.distributed and env.device.type == "cuda" and has_batchnorm(model):
        # Batch statistics over the GLOBAL batch: every rank normalises with the same mean/var,
        # so N ranks x B/N behave like one rank x B. CUDA only: SyncBatchNorm needs CUDA tensors
        # (the CPU path keeps per-rank BatchNorm and averages the running statistics instead).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.cudnn_benchmark and env.device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True
    return model


@torch.no_grad()
def average_buffers(model: nn.Module, env: DistEnv) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over ranks, in place.

    Per-rank BatchNorm (the CPU path): DDP broadcasts rank 0's buffers at the start of every forward
    (``broadcast_buffers``, its default), then each rank updates them from its own batch, so the
    running statistics follow rank 0's batches and the ranks end an epoch differing by their last
    batch's update. Averaging them before evaluation and export gives every rank the same model.
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
