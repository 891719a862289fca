"""The accelerate engine (``--engine accelerate``): our training loop, with ``accelerate.Accelerator``
doing device placement, DDP wrapping, mixed precision and backward.

What Accelerator does, and what stays ours (and why):

* Under a launcher we create THE process group first, with ``dist.join_process_group`` (gloo on the
  CPU, nccl on CUDA; the per-attempt elastic store and the early imports of ``dist.py``), and
  ``Accelerator(cpu=...)`` adopts it (it only creates a group when none exists) and picks the
  device. Our ``DistEnv`` is read from its state, so there is exactly one process group and our
  collectives (exact evaluation, training sums, barriers) run on it.
  ``cpu=True`` whenever the device is the CPU: without it accelerate sees ONE process on a machine
  without CUDA, even under ``torchrun`` (measured with accelerate 1.15, see the team guide).
* ``accelerator.prepare_model`` moves the model, wraps it in DDP and, for bf16/fp16, patches the
  module's own ``forward`` with autocast (so evaluation through the raw module autocasts too).
* ``accelerator.backward(loss)`` runs the backward pass (``accelerator.scaler.scale(loss)`` for fp16).
* NOT given to ``prepare``: the data, the optimizer, the scheduler.
  - data: our ``TensorBatches`` / ``LoaderBatches`` keep the ``DistributedSampler`` order (seed,
    ``set_epoch``, ``drop_last``), identical to the ddp engine; a prepared DataLoader would be
    re-sharded by accelerate.
  - scheduler: ``AcceleratedScheduler`` steps the wrapped scheduler ``num_processes`` times per
    optimizer step (``split_batches=False``), which would run OneCycle N times too fast.
  - optimizer: kept plain so that ``scaler.unscale_`` / ``scaler.step`` / ``scaler.update`` in the
    Trainer use ``accelerator.scaler`` on the same optimizer object, and checkpoints hold a plain
    optimizer state.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrainConfig
from ..dist import (DistEnv, default_threads, join_process_group, launched_by_torchrun, launcher_name,
                    launcher_world, pick_backend, pick_device)
from ..errors import UserError
from ._base import Engine, Precision, resolve_precision

# accelerate's names for our --amp values
_TO_ACCELERATE = {"off": "no", "bf16": "bf16", "fp16": "fp16"}
_FROM_ACCELERATE = {"no": "off", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class AccelerateEnv(DistEnv):
    """A DistEnv read from the Accelerator's state, carrying the Accelerator for the engine."""

    accelerator: Any = field(default=None, repr=False, compare=False)


def resolve_mixed_precision(amp: str, device: torch.device) -> str:
    """Our --amp → our resolved name (off/bf16/fp16). With --amp auto, a launcher's
    ``--mixed_precision`` (ACCELERATE_MIXED_PRECISION) decides; an explicit --amp always wins."""
    if amp == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
        if launcher:
            if launcher not in _FROM_ACCELERATE:
                raise UserError(
                    f"ACCELERATE_MIXED_PRECISION={launcher!r} (accelerate launch --mixed_precision) is "
                    f"not supported here; use one of: {', '.join(_FROM_ACCELERATE)}"
                )
            amp = _FROM_ACCELERATE[launcher]
    return resolve_precision(amp, device).name  # UserError for fp16 on the CPU


def _import_accelerate():
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise UserError("--engine accelerate needs the accelerate package: pip install accelerate "
                        "(or pip install -e '.[accelerate]')") from None


def make_accelerator(cpu: bool, amp: str, init: Any, world_size: int) -> Any:
    """``accelerate.Accelerator``, checked: no accelerate-side gradient accumulation, and as many
    processes as the launcher started."""
    from accelerate import Accelerator

    with warnings.catch_warnings():
        # accelerate sets torch threads itself when OMP_NUM_THREADS is unset; setup sets them after
        warnings.filterwarnings("ignore", message=".*OMP_NUM_THREADS.*")
        try:
            accelerator = Accelerator(cpu=cpu, mixed_precision=_TO_ACCELERATE[amp], kwargs_handlers=[init])
        except ValueError as exc:  # accelerate's own configuration errors
            raise UserError(f"accelerate: {' '.join(str(exc).split())}") from None
    if accelerator.gradient_accumulation_steps != 1:
        raise UserError(
            f"gradient accumulation ({accelerator.gradient_accumulation_steps} steps, from accelerate "
            f"launch / ACCELERATE_GRADIENT_ACCUMULATION_STEPS) is not how mnist-dist accumulates: use "
            f"--grad-accum K (either engine; --batch-size stays the global batch)"
        )
    if accelerator.num_processes != world_size:
        raise UserError(
            f"the launcher started {world_size} processes but accelerate sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type})"
        )
    return accelerator


def setup(cfg: TrainConfig) -> AccelerateEnv:
    """Create the Accelerator (and with it the process group); return our DistEnv from its state."""
    _import_accelerate()
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    rank, local_rank, world_size, local_world_size = launcher_world()
    if world_size > 1 and not launched_by_torchrun():
        raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun or accelerate launch")
    # Our checks first (one readable line): too few GPUs for the local ranks, --device cuda without CUDA.
    wanted = pick_device(cfg.device, local_rank, local_world_size)
    if wanted.type == "cuda":
        # before anything touches CUDA (the bf16 probe, the process group): otherwise every rank
        # creates a context on GPU 0 first
        torch.cuda.set_device(wanted)
    cpu = wanted.type == "cpu"
    if cpu and cfg.backend == "nccl":
        raise UserError("--backend nccl needs CUDA devices; use gloo (or auto) on the CPU")
    amp = resolve_mixed_precision(cfg.amp, wanted)
    # gloo on the CPU (never mpi, which accelerate would prefer when torch has it); auto = nccl on CUDA.
    # Only under a launcher (the condition accelerate uses to form a group): a backend given to a
    # plain single process makes accelerate expect a group that nobody creates.
    backend = "gloo" if cpu else (None if cfg.backend == "auto" else cfg.backend)
    init = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if backend is not None and (os.environ.get("LOCAL_RANK", "") != "" or world_size > 1):
        init.backend = backend
    if launched_by_torchrun() and not torch.distributed.is_initialized():
        # Our own group (per-attempt elastic store, early imports: see dist.py); accelerate adopts
        # a group that already exists instead of creating one.
        join_process_group(pick_backend(cfg.backend, wanted), wanted, rank, world_size, cfg.dist_timeout)
    accelerator = make_accelerator(cpu, amp, init, world_size)
    distributed = accelerator.distributed_type != DistributedType.NO
    device = accelerator.device
    if device.type == "cpu":
        device = torch.device("cpu")  # accelerate says cpu:0 for MULTI_CPU; same device
    elif device != wanted:
        raise UserError(f"accelerate chose {device} but local rank {local_rank} should use {wanted}")
    torch.set_num_threads(cfg.threads or default_threads(local_world_size))
    return AccelerateEnv(
        rank=accelerator.process_index,
        local_rank=accelerator.local_process_index,
        world_size=accelerator.num_processes,
        local_world_size=local_world_size,
        device=device,
        backend=str(accelerator.state.backend) if distributed else None,
        launcher=launcher_name(),
        accelerator=accelerator,
    )


class AccelerateEngine(Engine):
    """The engine interface, carried out by ``accelerate.Accelerator``."""

    name = "accelerate"

    def __init__(self, cfg: TrainConfig, env: AccelerateEnv, precision: Precision) -> None:
        super().__init__(cfg, env, precision)
        self.accelerator = env.accelerator

    @classmethod
    def setup(cls, cfg: TrainConfig) -> "AccelerateEngine":
        env = setup(cfg)
        accelerator = env.accelerator
        name = _FROM_ACCELERATE.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))
        scaler = accelerator.scaler  # a GradScaler for fp16 on CUDA, else None
        if scaler is None:
            scaler = torch.amp.GradScaler(env.device.type, enabled=False)
        return cls(cfg, env, Precision(name, env.device, scaler))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Device placement and DDP by accelerate. ``model`` stays the raw module.

        For bf16/fp16, ``prepare_model`` also patches the module's own ``forward`` with autocast. We
        take that patch off again and autocast the training step with ``accelerator.autocast()``
        instead (the same context, the same numerics): a patched forward would make every use of the
        raw module mixed precision too — the evaluation (which is fp32 for both engines, so that
        summary.json, ``evaluate`` and model.pt2 agree) and the ``torch.export`` of model.pt2.
        """
        wrapped = self.accelerator.prepare_model(model)
        if self.accelerator.unwrap_model(wrapped) is not model:
            raise RuntimeError("accelerate replaced the model instead of wrapping it")
        if "_original_forward" in model.__dict__:
            model.__dict__.pop("forward", None)  # back to the class's own forward
            del model._original_forward
        return wrapped

    def unwrap(self, wrapped: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(wrapped)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()  # a no-op without mixed precision

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # accelerator.scaler.scale(loss) for fp16

    def no_sync(self, wrapped: torch.nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(wrapped)


ENGINE = AccelerateEngine
