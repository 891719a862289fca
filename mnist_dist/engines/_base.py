"""The engine interface the training loop talks to, and mixed precision (``Precision``).

The loop never asks which engine it runs on. It calls, per run: ``setup`` (process group, device,
precision), ``configure_torch`` (process-wide settings), ``prepare`` (the plain model: SyncBatchNorm,
channels_last), ``wrap`` (the module to train through: DDP or the engine's own wrapper, compiled with
``--compile``), ``unwrap`` (the raw module, for evaluation and saving), ``teardown``; per step:
``autocast``, ``backward``, ``optimizer_step`` (GradScaler unscale, clipping, step, update); and
``no_sync`` around the micro-batches of an accumulation step whose gradients must not be all-reduced
yet; for checkpoints and ``model.pt``: ``model_state`` / ``load_model_state``, ``optimizer_state`` /
``load_optimizer_state`` (the full, unsharded state; collectives under fsdp2) and ``final_model`` (what
rank 0 exports).

This base class is the DDP behaviour without DDP-specific wrapping; ``ddp.py`` adds the wrapper,
``accelerate.py`` hands the same calls to ``accelerate.Accelerator``; ``fsdp2.py`` shards the model
with ``fully_shard``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .. import dist
from ..config import TrainConfig
from ..dist import DistEnv
from ..errors import UserError
from ..models import clean_state_dict

CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS workspace setting that makes its kernels deterministic
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # --compile-mode values that capture CUDA graphs


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


def restore_scaler(precision: Precision, state: dict[str, Any]) -> str:
    """The GradScaler's state from a checkpoint, only where it exists and applies. ``--amp`` may change
    across a resume (a requeue onto another GPU type): a bf16/off checkpoint holds a disabled scaler's
    empty state, which an fp16 run's enabled scaler cannot load ("The source state dict is empty"); it
    starts from its initial scale instead. An fp16 checkpoint's scale is ignored by a bf16/off run.
    Returns a note for the resume line ("" or e.g. "amp bf16 -> fp16")."""
    saved = state.get("scaler") or {}
    scaler = precision.scaler
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)
    before = state.get("precision") or ("fp16" if saved else None)
    if before is None or before == precision.name:
        return ""
    fresh = " (GradScaler starts at its initial scale)" if scaler.is_enabled() and not saved else ""
    return f"amp {before} -> {precision.name}{fresh}"


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
        self.skipped_steps = (torch.zeros(1, dtype=torch.int64, device=env.device)
                              if precision.scaler.is_enabled() else None)

    @classmethod
    def setup(cls, cfg: TrainConfig) -> "Engine":
        """Join the process group (under a launcher), pick the device and the precision."""
        raise NotImplementedError

    def configure_torch(self) -> None:
        """Process-wide torch settings; before the model is built and before the first cuBLAS call:
        ``--deterministic``, TF32 for fp32 matmuls/convolutions on CUDA when AMP is off, Inductor's
        compile workers shared by the local ranks."""
        cfg, device = self.cfg, self.env.device
        if cfg.deterministic:
            # cuBLAS reads this when its handle is created (the first matmul), so setting it here works
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
            # warn_only: an op without a deterministic kernel warns (naming itself) instead of failing
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        if device.type == "cuda" and self.precision.name == "off":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls (Ampere+)
            torch.backends.cudnn.allow_tf32 = True
        if cfg.compile:
            # Inductor starts one compile worker per core by default, in EVERY rank
            os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(dist.default_threads(self.env.local_world_size)))
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])

    def prepare(self, model: nn.Module) -> nn.Module:
        """The plain model before it is wrapped: SyncBatchNorm (``--sync-bn``, a process group on CUDA),
        channels_last, cuDNN autotune.

        SyncBatchNorm is opt-in: it is not sync-free (host syncs and a blocking all_gather in every BN
        layer) and DDP refuses it on the CPU. By default BatchNorm stays per rank and the running
        statistics are averaged before each evaluation (``metrics.average_buffers``)."""
        cfg, env = self.cfg, self.env
        if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and env.device.type != "cuda":
            raise UserError(f"--compile-mode {cfg.compile_mode} uses CUDA graphs and needs a CUDA device; "
                            f"on the CPU use --compile-mode default")
        if cfg.sync_bn and env.distributed and env.device.type == "cuda" and has_batchnorm(model):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # global-batch statistics
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.cudnn_benchmark and env.device.type == "cuda" and not cfg.deterministic:
            torch.backends.cudnn.benchmark = True
        return model

    def wrap_for_training(self, model: nn.Module) -> nn.Module:
        """``wrap``, then ``torch.compile`` of the wrapper with ``--compile`` (evaluation stays eager)."""
        wrapped = self.wrap(model)
        if self.unwrap(wrapped) is not model:
            raise RuntimeError(f"engine {self.name} does not unwrap to the model it wrapped")
        if not self.cfg.compile:
            return wrapped
        mode = None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        return torch.compile(wrapped, mode=mode)

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

    # The model's and optimizer's state, for checkpoints and model.pt. Every rank calls these (under
    # fsdp2 they are collectives); here they are what a plain or DDP-wrapped module does.
    def model_state(self, model: nn.Module) -> dict[str, Any]:
        return clean_state_dict(model.state_dict())

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from ..optim import load_optimizer_state  # only a resume loads (the default run does not)

        load_optimizer_state(optimizer, state)

    def final_model(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """What rank 0 exports (model.pt2) after the last barrier, given ``model_state``'s result."""
        return model

    def teardown(self) -> None:
        dist.teardown()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def uses_sync_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
