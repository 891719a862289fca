"""The training loop, read top to bottom: a step, an epoch, an evaluation; stop signals and checkpoints.

No host-device synchronisation inside the step: metrics are summed on the device and read once per
epoch (plus one ``loss.item()`` every ``log_every`` steps, only while a progress bar shows). The loop
talks to the engine (``engines/base.py``) and never asks which engine it is.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import faults
from ..checkpoint import state as checkpoint_state
from ..config import TrainConfig
from ..dist import DistEnv, checked_barrier, synchronize
from ..engines.base import Engine
from ..engines.prepare import average_buffers
from ..errors import StopTraining
from ..outputs.tracking import Tracker
from .evaluate import EvalResult, TrainSums, evaluate
from .lagged import LaggedRead
from .monitor import Monitor
from .optim import planned_steps, rewind_schedule
from .progress import Progress
from .stopping import StopRequest, signal_name


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


@dataclass
class Trainer:
    """Everything one training run holds; ``train.fit`` drives it epoch by epoch."""

    cfg: TrainConfig
    env: DistEnv
    engine: Engine
    model: torch.nn.Module  # the raw module: evaluation and saving use it
    wrapped: torch.nn.Module  # what the step trains through (DDP / accelerate / compiled), else the model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Any  # data.TensorBatches or data.LoaderBatches
    test_images: torch.Tensor
    test_labels: torch.Tensor
    transform: Any = None  # data.augment.BatchTransform (augmentation, channels_last) or None
    grad_accum: int = 1  # micro-batches per optimizer step (--grad-accum, resolved)
    progress: Progress = field(default_factory=Progress)  # where the run is; saved in checkpoints
    stop: StopRequest = field(default_factory=StopRequest)
    tracker: Tracker = field(default_factory=Tracker)  # wandb on rank 0, else a no-op
    monitor: Monitor = field(default_factory=Monitor)  # data wait, peak memory; --profile, --tensorboard
    epoch_started: float = 0.0  # perf_counter() when this process started the epoch in progress
    rewound: int = 0  # fp16 steps the GradScaler skipped that were taken back from the LR schedule
    skip_reader: LaggedRead | None = None
    # called on every rank after each checkpoint with (its path on rank 0, else None; metrics):
    # the Ray launcher reports our checkpoint files to Ray Train through it (launchers/ray_train.py)
    on_checkpoint: Callable[[str | None, dict[str, Any]], None] | None = None
    on_evaluation: Any = None  # called with each evaluation's record (fit: the run's evaluations.jsonl)

    def __post_init__(self) -> None:
        if self.precision.scaler.is_enabled():
            # a skipped first step makes the scheduler warn; reconcile_schedule takes such steps back
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.skip_reader = LaggedRead(self.env.device)

    @property
    def precision(self):
        return self.engine.precision

    @property
    def total_steps(self) -> int:
        return planned_steps(self.cfg, len(self.batches))

    @property
    def finished(self) -> bool:
        return self.progress.global_step >= self.total_steps

    def train_step(self, x: torch.Tensor, y: torch.Tensor, sums: TrainSums) -> torch.Tensor:
        """One optimizer step on this rank's share of the global batch, in ``grad_accum`` micro-batches:
        the gradient all_reduce runs once, with the last micro-batch (``no_sync`` on the others), and
        each micro-batch's loss is scaled by 1/K, so the step equals one step on the whole batch."""
        engine, k = self.engine, self.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k)) if k > 1 else [(x, y)]):
            with engine.no_sync(self.wrapped) if i < k - 1 else contextlib.nullcontext():
                with engine.autocast():
                    logits = self.wrapped(xm)
                loss = F.cross_entropy(logits.float(), ym, label_smoothing=self.cfg.label_smoothing)
                engine.backward(loss / k if k > 1 else loss)
            sums.add(loss, logits, ym)
            losses.append(loss.detach())
        engine.optimizer_step(self.optimizer, self.model.parameters(), self.cfg.grad_clip)
        self.scheduler.step()
        self.progress.global_step += 1
        return losses[0] if k == 1 else torch.stack(losses).mean()

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """One batch of the epoch and what follows it: the step, the time-to-target evaluation,
        tracking, fault injection, periodic checkpoints and the ranks' periodic checks. No host sync
        unless one of those is due and needs it (an evaluation, wandb, a checkpoint)."""
        cfg, p = self.cfg, self.progress
        if self.transform is not None:
            x = self.transform(x, epoch, step)
        loss = self.train_step(x, y, p.sums)
        p.step_in_epoch = step + 1
        if p.clock.due(p.global_step):  # evaluates with the clock paused
            result, seconds_now = p.clock.check(self.evaluate, self.env.device, p.train_seconds + p.epoch_seconds,
                                                self.epoch_started, p.global_step)
            self.record_evaluation(result, seconds_now, "step")
        self.tracker.log_step(p.global_step, loss, self.optimizer)  # syncs only when wandb is on
        self.monitor.after_step(p.global_step, loss, self.optimizer)  # --profile, --tensorboard (else nothing)
        faults.maybe_fail("step", p.global_step)
        if cfg.checkpoint_every and p.global_step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if p.global_step % cfg.stop_check_every == 0:  # on CUDA: acts on the previous check's values
            self.reconcile_schedule(at_once=False)
            self.stop_if_requested(at_once=False)
        return loss

    def train_epoch(self, show_progress: bool = False) -> tuple[float, float, int, float]:
        """Train from the saved step to the end of the epoch; returns (loss, accuracy, images, seconds)."""
        cfg, p = self.cfg, self.progress
        epoch, start_step = p.epoch, p.step_in_epoch
        self.model.train()
        if p.sums is None:
            p.sums = TrainSums(self.env.device)
        bar = progress_bar(len(self.batches) - start_step, f"epoch {epoch + 1}/{cfg.epochs}", show_progress)
        self.monitor.start_epoch(self.env.device)
        synchronize(self.env.device)
        p.clock.start_epoch()
        started = self.epoch_started = time.perf_counter()
        batches = self.monitor.batches(self.batches.epoch(epoch, start_step))  # times the data wait
        for step, (x, y) in enumerate(batches, start=start_step):
            if self.finished:
                break
            loss = self.train_batch(x, y, epoch, step)
            bar.update(1)
            if show_progress and (step + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        synchronize(self.env.device)
        seconds = p.epoch_seconds + p.clock.end_epoch(time.perf_counter() - started)
        bar.close()
        checked_barrier(self.env, cfg.dist_timeout)  # names the ranks that did not reach the epoch's end
        self.reconcile_schedule()
        self.stop_if_requested()
        loss, accuracy, images = p.sums.reduce(self.env)
        return loss, accuracy, images, seconds

    def end_epoch(self, seconds: float) -> None:
        self.progress.end_epoch(seconds)
        self.epoch_started = 0.0

    def record_evaluation(self, result: EvalResult, train_seconds: float, kind: str) -> None:
        """One line of evaluations.jsonl: every exact evaluation, mid-epoch ("step") or at an epoch end
        ("epoch"), by global step. A sweep's pruner reads it while the run trains."""
        if self.on_evaluation is not None:
            self.on_evaluation({"global_step": self.progress.global_step, "epoch": self.progress.epoch + 1,
                                "images_seen": self.progress.global_step * self.cfg.batch_size,
                                "kind": kind, "test_accuracy": result.accuracy, "test_loss": result.loss,
                                "test_correct": result.correct, "train_seconds": train_seconds})

    def evaluate(self) -> EvalResult:
        """Exact, and in fp32 whatever ``--amp`` trains with (10,000 images are cheap), so that
        summary.json, ``mnist-dist evaluate`` and model.pt2 count the same images correct."""
        average_buffers(self.model, self.env)  # per-rank BatchNorm statistics -> one model
        return evaluate(self.model, self.test_images, self.test_labels, self.env, self.cfg.eval_batch_size)

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

    # ------------------------------------------------------------------ checkpoints and stopping
    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> str | None:
        """Collective: every rank contributes its RNG state; rank 0 writes; all wait for the file.
        ``metrics`` (the epoch's record at an epoch end) go to ``on_checkpoint`` with the path."""
        checked_barrier(self.env, self.cfg.dist_timeout)  # names the ranks that did not come
        self.reconcile_schedule()  # the saved schedule counts exactly the optimizer steps taken
        path = checkpoint_state.save(self)
        if self.on_checkpoint is not None:
            p = self.progress
            self.on_checkpoint(path, metrics if metrics is not None else {
                "epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step})
        return path

    def restore(self, state: dict[str, Any], source: str) -> str:
        return checkpoint_state.restore(self, state, source)

    def stop_if_requested(self, at_once: bool = True) -> None:
        signum = self.stop.agreed(self.env, at_once)
        if not signum:
            return
        path = self.save_checkpoint()
        p = self.progress
        log(self.env, f"stopped by signal {signal_name(signum)} at epoch {p.epoch + 1} step "
                      f"{p.step_in_epoch} (global step {p.global_step}); checkpoint {path}; "
                      f"continue with --resume auto --out-dir {self.cfg.out_dir}")
        raise StopTraining(signum, path)
