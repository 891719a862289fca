"""Speed to accuracy: model preparation, on-device batch augmentation, warm-up, time-to-target.

* ``prepare_model``: BatchNorm -> SyncBatchNorm under a process group on CUDA, channels_last,
  cuDNN autotune. On the CPU (gloo) DDP refuses SyncBatchNorm ("SyncBatchNorm layers only work with
  GPU modules", torch 2.14), so BatchNorm stays per rank and ``average_buffers`` makes the running
  statistics identical on every rank before each evaluation (exact eval, identical saved weights).
* ``compile_model``: ``torch.compile`` of the training module (the DDP wrapper when there is one).
* ``BatchTransform``: random rotation / shift / zoom of a whole batch tensor with one
  ``affine_grid`` + ``grid_sample`` on the device (no per-sample PIL). The random parameters of an
  epoch come from a ``torch.Generator`` seeded from (seed, rank, epoch), drawn for the whole epoch at
  once and sliced by step: a run resumed at any step sees exactly the same augmented batches.
* ``warm_up``: untimed steps (compilation, autotuning), then the model, optimizer, scheduler, scaler
  and RNG are put back exactly as they were, so the timed run is the run that would have happened.
* ``TargetClock``: the training seconds (evaluation excluded) until the test accuracy first reaches
  ``--target-accuracy``, evaluated every ``--eval-every`` steps and at every epoch end.

Nothing here reads the device inside a training step: no ``.item()``, no host copies.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import IMAGE_SIDE, MNIST_MEAN, MNIST_STD
from .dist import DistEnv
from .errors import UserError

CUDA_GRAPH_MODES = ("reduce-overhead",)


# ----------------------------------------------------------------------------- model
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def prepare_model(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """SyncBatchNorm (process group on CUDA), channels_last, cuDNN autotune. Before DDP."""
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
    import torch.distributed as dist

    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
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


# ----------------------------------------------------------------------------- augmentation
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


def build_batch_transform(cfg: TrainConfig, env: DistEnv, per_rank_batch: int,
                          steps_per_epoch: int) -> BatchTransform | None:
    if not (cfg.augment or cfg.channels_last):
        return None
    return BatchTransform(cfg, env, per_rank_batch, steps_per_epoch)


# ----------------------------------------------------------------------------- warm-up
def warm_up(trainer: Any, steps: int) -> float:
    """Run ``steps`` untimed training steps, then restore every piece of state. Returns seconds."""
    if steps <= 0:
        return 0.0
    from .metrics import TrainSums
    from .train import synchronize

    device = trainer.env.device
    saved = {
        "model": copy.deepcopy(trainer.model.state_dict()),
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "scaler": copy.deepcopy(trainer.precision.scaler.state_dict()),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "global_step": trainer.global_step,
    }
    started = time.perf_counter()
    sums = TrainSums(device)
    trainer.model.train()
    batches = trainer.batches.epoch(0)
    for step in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = trainer.batches.epoch(0)
            x, y = next(batches)
        if trainer.transform is not None:
            x = trainer.transform(x, 0, step % len(trainer.batches))
        trainer.train_step(x, y, sums)
    synchronize(device)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        trainer.model.load_state_dict(saved["model"])  # copies in place: compiled graphs stay valid
    trainer.optimizer.load_state_dict(saved["optimizer"])  # also empties Adam's moment buffers
    trainer.scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:
        trainer.precision.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["cpu_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)
    trainer.global_step = saved["global_step"]
    return seconds


# ----------------------------------------------------------------------------- time to target
class TargetClock:
    """Training seconds until the test accuracy first reaches the target.

    The clock is the training loop's own (synchronised, evaluation excluded): mid-epoch
    evaluations every ``eval_every`` steps pause it; epoch-end evaluations happen outside it.
    Resolution: ``eval_every`` steps (or one epoch when 0). All ranks take the same decisions,
    because the accuracy comes from the exact all_reduce evaluation. What it has recorded is part
    of every checkpoint (``state_dict``), so a resumed run reports the time of the first run that
    reached the target, and the seconds of earlier attempts count (the Trainer's train_seconds).
    """

    def __init__(self, every: int = 0, target: float = 1.0) -> None:
        self.every, self.target = every, target  # the defaults only time reaching 100% at epoch ends
        self.paused = 0.0  # evaluation seconds inside the current epoch
        self.evaluations = 0
        self.seconds: float | None = None
        self.steps: int | None = None
        self.accuracy: float | None = None
        self.reached_unix: float | None = None

    @property
    def reached(self) -> bool:
        return self.seconds is not None

    def start_epoch(self) -> None:
        self.paused = 0.0

    def due(self, global_step: int) -> bool:
        return bool(self.every) and not self.reached and global_step % self.every == 0

    def check(self, trainer: Any, epoch_started: float) -> None:
        """Mid-epoch: stop the clock, evaluate exactly, record, restart the clock."""
        from .train import synchronize

        synchronize(trainer.env.device)
        now = time.perf_counter()
        # finished epochs + this epoch before a resume + this epoch since, without evaluations
        train_seconds = trainer.train_seconds + trainer.epoch_seconds + (now - epoch_started - self.paused)
        result = trainer.evaluate()
        self.evaluations += 1
        self._record(result.accuracy, train_seconds, trainer.global_step)
        self.paused += time.perf_counter() - now

    def end_epoch(self, raw_seconds: float) -> float:
        """The epoch's training seconds without mid-epoch evaluations."""
        seconds = raw_seconds - self.paused
        self.paused = 0.0
        return seconds

    def epoch_evaluated(self, accuracy: float, train_seconds: float, global_step: int) -> None:
        self._record(accuracy, train_seconds, global_step)

    def _record(self, accuracy: float, train_seconds: float, global_step: int) -> None:
        if not self.reached and accuracy >= self.target:
            self.seconds, self.steps, self.accuracy = train_seconds, global_step, accuracy
            self.reached_unix = time.time()

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "seconds": self.seconds, "steps": self.steps,
                "accuracy": self.accuracy, "reached_unix": self.reached_unix}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = int(state.get("evaluations", 0))
        self.seconds, self.steps = state.get("seconds"), state.get("steps")
        self.accuracy, self.reached_unix = state.get("accuracy"), state.get("reached_unix")


def summary_fields(trainer: Any, warmup_seconds: float) -> dict[str, Any]:
    """Extra summary.json keys: time to target, precision and compile settings."""
    clock: TargetClock = trainer.clock
    scaler = trainer.precision.scaler
    cfg = trainer.cfg
    return {
        "target_accuracy": clock.target,
        "seconds_to_target": clock.seconds,
        "steps_to_target": clock.steps,
        "accuracy_at_target": clock.accuracy,
        "reached_target_unix": clock.reached_unix,
        "mid_epoch_evaluations": clock.evaluations,
        "warmup_seconds": warmup_seconds,
        "amp": trainer.precision.name,
        "grad_scaler_enabled": scaler.is_enabled(),
        "grad_scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode if cfg.compile else None,
        "channels_last": cfg.channels_last,
        "sync_batchnorm": any(isinstance(m, nn.SyncBatchNorm) for m in trainer.model.modules()),
    }
