"""The step, and what one run holds: model, optimizer, schedule, data, where the run is, its clock.

``train_step`` is the whole optimizer step. ``Trainer`` holds the run's state, and
``state_dict`` / ``load_state_dict`` are its contract (shaped like torch's ``Stateful``, per rank):
checkpoints are built from it (``checkpoint.py`` gathers the ranks' parts to rank 0 and writes the
file), a resume puts it back, and the warm-up takes it before its untimed steps and restores it after.
The loop that drives it is ``train.py``.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .clock import RunClock
from .config import TrainConfig, grad_accum_steps
from .data import mnist
from .data.batches import TensorBatches
from .dist import DistEnv, synchronize
from .engines._base import Engine, restore_scaler
from .errors import UserError
from .metrics import Resources, TrainSums, average_buffers, evaluate
from .models import build_model
from .optim import build_optimizer, build_scheduler, planned_steps, rewind_schedule
from .rng import rng_state, seed_everything, set_rng_state
from .stopping import StopRequest


def train_step(trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on this rank's share of the global batch, in ``grad_accum`` micro-batches:
    the gradient all_reduce runs once, with the last micro-batch (``no_sync`` on the others), and each
    micro-batch's loss is scaled by 1/K, so the step equals one step on the whole batch. No host sync."""
    engine, k = trainer.engine, trainer.grad_accum
    trainer.optimizer.zero_grad(set_to_none=True)
    losses = []
    for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k)) if k > 1 else [(x, y)]):
        with engine.no_sync(trainer.wrapped) if i < k - 1 else contextlib.nullcontext():
            with engine.autocast():
                logits = trainer.wrapped(xm)
            loss = F.cross_entropy(logits.float(), ym, label_smoothing=trainer.cfg.label_smoothing)
            engine.backward(loss / k if k > 1 else loss)
        trainer.sums.add(loss, logits, ym)
        losses.append(loss.detach())
    engine.optimizer_step(trainer.optimizer, trainer.model.parameters(), trainer.cfg.grad_clip)
    trainer.scheduler.step()
    trainer.position.global_step += 1
    return losses[0] if k == 1 else torch.stack(losses).mean()


@dataclass
class Position:
    """Where the run is."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of that epoch already consumed
    global_step: int = 0  # optimizer steps so far
    world_sizes: list[int] = field(default_factory=list)  # the world sizes the run went through, in order
    tracker_run_id: str | None = None  # the experiment tracker's run, continued by a resumed job
    restarts: list[dict[str, Any]] = field(default_factory=list)  # elastic restarts: resumed, reached, lost steps

    def joined_at(self, world_size: int) -> None:
        """Record the world size this (re)start runs at."""
        if not self.world_sizes or self.world_sizes[-1] != world_size:
            self.world_sizes.append(world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "world_sizes": list(self.world_sizes), "tracker_run_id": self.tracker_run_id,
                "restarts": [dict(r) for r in self.restarts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.world_sizes = [int(w) for w in state.get("world_sizes", [state["world_size"]])]
        self.tracker_run_id, self.restarts = state.get("tracker_run_id"), list(state.get("restarts", []))


@dataclass
class Trainer:
    cfg: TrainConfig
    env: DistEnv
    engine: Engine
    model: torch.nn.Module  # the raw module: evaluation and saving use it
    wrapped: torch.nn.Module  # what the step trains through (DDP / accelerate / compiled)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Any  # data.batches.TensorBatches or data.loader.LoaderBatches
    test_images: torch.Tensor
    test_labels: torch.Tensor
    transform: Any = None  # data.augment.BatchTransform (augmentation, channels_last) or None
    grad_accum: int = 1  # micro-batches per optimizer step (--grad-accum, resolved)
    position: Position = field(default_factory=Position)
    clock: RunClock = field(default_factory=RunClock)
    sums: TrainSums | None = None  # this rank's loss/correct/count of the epoch in progress
    resources: Resources = field(default_factory=Resources)  # the epoch's data wait and peak memory
    stop: StopRequest = field(default_factory=StopRequest)
    rewound: int = 0  # fp16 steps the GradScaler skipped, taken back from the LR schedule

    def __post_init__(self) -> None:
        self.sums = self.sums or TrainSums(self.env.device)
        self.skip_reader = None
        if self.precision.scaler.is_enabled():
            from .lagged import LaggedRead

            # a skipped first step makes the scheduler warn; reconcile_schedule takes such steps back
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.skip_reader = LaggedRead(self.env.device)

    @classmethod
    def build(cls, cfg: TrainConfig, engine: Engine) -> "Trainer":
        """Seed, data on the device, the model prepared and wrapped by the engine, optimizer, schedule."""
        env, device = engine.env, engine.env.device
        engine.configure_torch()
        seed_everything(cfg.seed)
        mnist.prepare(cfg.data_dir, env, cfg.download)
        train_u8, train_labels = mnist.load_split(cfg.data_dir, train=True)
        test_u8, test_labels = mnist.load_split(cfg.data_dir, train=False)
        per_rank_batch = cfg.batch_size // env.world_size
        if per_rank_batch > len(train_labels) // env.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set")
        if cfg.loader == "tensor":
            batches: Any = TensorBatches(mnist.to_float(train_u8, cfg.normalize).to(device),
                                         train_labels.to(device), env, per_rank_batch, cfg.seed)
        else:
            from .data.loader import LoaderBatches

            batches = LoaderBatches(cfg.data_dir, cfg.normalize, env, per_rank_batch, cfg.seed, cfg.num_workers)
        model = engine.prepare(build_model(cfg.model)).to(device)
        wrapped = engine.wrap_for_training(model)
        optimizer = build_optimizer(cfg, model.parameters(), device)
        scheduler = build_scheduler(cfg, optimizer, total_steps=planned_steps(cfg, len(batches)))
        transform = None
        if cfg.augment or cfg.channels_last:
            from .data.augment import BatchTransform

            transform = BatchTransform(cfg, env, per_rank_batch, len(batches))
        return cls(cfg, env, engine, model, wrapped, optimizer, scheduler, batches,
                   mnist.to_float(test_u8, cfg.normalize).to(device), test_labels.to(device), transform,
                   grad_accum=grad_accum_steps(cfg, env.world_size),
                   clock=RunClock(cfg.eval_every, cfg.target_accuracy))

    @property
    def precision(self):
        return self.engine.precision

    @property
    def finished(self) -> bool:
        return (self.position.global_step >= planned_steps(self.cfg, len(self.batches))
                or self.position.epoch >= self.cfg.epochs)

    def epoch_batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, images, labels) of the epoch in progress from where it stands, augmented; the data
        wait timed."""
        epoch, start = self.position.epoch, self.position.step_in_epoch
        for step, (x, y) in enumerate(self.resources.batches(self.batches.epoch(epoch, start)), start=start):
            yield step, (self.transform(x, epoch, step) if self.transform is not None else x), y

    def evaluate(self):
        """Exact, and in fp32 whatever ``--amp`` trains with, so that summary.json, ``mnist-dist
        evaluate`` and model.pt2 count the same images correct. A collective."""
        average_buffers(self.model, self.env)  # per-rank BatchNorm statistics -> one model
        return evaluate(self.model, self.test_images, self.test_labels, self.env, self.cfg.eval_batch_size)

    def end_epoch(self) -> None:
        self.clock.end_epoch()
        self.position.epoch, self.position.step_in_epoch = self.position.epoch + 1, 0
        self.sums = TrainSums(self.env.device)

    def reconcile_schedule(self, at_once: bool = True) -> None:
        """Take the optimizer steps fp16's GradScaler skipped back from the LR schedule (a no-op
        without fp16). ``at_once=False``: from the previous check's count, without a host sync."""
        if self.skip_reader is None:
            return
        if at_once:
            total = int(self.engine.skipped_steps.item())
        else:
            previous = self.skip_reader.exchange(self.engine.skipped_steps)
            if previous is None:
                return
            total = previous[0]
        rewind_schedule(self.scheduler, total - self.rewound)
        self.rewound = max(self.rewound, total)

    # ------------------------------------------------------------------ the state contract
    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """This rank's state (its RNGs, its epoch sums); the schedule counts the steps really taken.
        ``weights`` False: no model or optimizer (a sharded checkpoint saves them from every rank)."""
        self.reconcile_schedule()
        return {
            # collectives under fsdp2: every rank calls these
            "model": self.engine.model_state(self.model) if weights else {},
            "optimizer": self.engine.optimizer_state(self.model, self.optimizer) if weights else {},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "precision": self.precision.name,
            "rng": rng_state(),
            "train_sums": self.sums.sums,
            "config": self.cfg.to_json(),
            "world_size": self.env.world_size,
            "grad_accum": self.grad_accum,
            # the world-size-free position in this epoch's sample order (see data/batches.py)
            "epoch_samples": self.position.step_in_epoch * self.cfg.batch_size,
            **self.position.state_dict(),
            **self.clock.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> str:
        """The inverse of ``state_dict``. Tensors may come from the CPU: ``load_state_dict`` puts each
        where it belongs (Adam's ``step`` counts stay on the CPU, as Adam expects). ``rng`` None: a
        rank the checkpoint did not have, which seeds a fresh, distinct stream. Returns a note for
        the resume line ("" or e.g. "amp bf16 -> fp16")."""
        self.engine.load_model_state(self.model, state["model"])
        self.engine.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        note = restore_scaler(self.precision, state)
        self.position.load_state_dict(state)
        self.clock.load_state_dict(state, mid_epoch=self.position.step_in_epoch > 0)
        self.sums = TrainSums(self.env.device)
        if self.position.step_in_epoch:
            self.sums.load(state["train_sums"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        else:
            seed_everything(self.cfg.seed + self.env.rank + 1000 * self.position.epoch)
        return note

    def warm_up(self, steps: int) -> None:
        """``steps`` untimed training steps (compilation, autotuning), then the state they changed
        put back: the timed run is the run that would have happened without them."""
        if steps <= 0:
            return
        saved = copy.deepcopy(self.state_dict())
        started = time.perf_counter()
        self.model.train()
        batches = self.batches.epoch(0)
        for step in range(steps):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = self.batches.epoch(0)
                x, y = next(batches)
            if self.transform is not None:
                x = self.transform(x, 0, step % len(self.batches))
            train_step(self, x, y)
        synchronize(self.env.device)
        self.clock.warmup_seconds = time.perf_counter() - started
        self.load_state_dict(saved)
        if self.engine.skipped_steps is not None:
            self.engine.skipped_steps.zero_()  # the warm-up's skipped fp16 steps are not the run's
