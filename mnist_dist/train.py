"""The training loop, read top to bottom: build → for each epoch: train, evaluate, record → save.

No host-device synchronisation inside the step: metrics are summed on the device and read once
per epoch (plus one ``loss.item()`` every ``log_every`` steps, only while a progress bar shows).
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, data, faults, speed
from .config import TrainConfig
from .dist import DistEnv
from .errors import StopTraining, UserError
from .metrics import EvalResult, TrainSums, all_reduce_sum, evaluate
from .models import build_model, clean_state_dict, count_parameters
from .outputs import RunDir
from .stopping import StopRequest, signal_name
from .report import write_final_outputs
from .tracking import Tracker


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

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # the accelerate engine overrides this (accelerator.backward)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA devices that support it, else fp16 + GradScaler; off on the CPU."""
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "off"
    if mode == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or off")
    scaler = torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))
    return Precision(mode, device, scaler)


# ----------------------------------------------------------------------------- building blocks
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], nesterov=True,
                           weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 1), pct_start=0.25,
            cycle_momentum=False,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_hostnames(env: DistEnv) -> list[str]:
    name = socket.gethostname()
    if not env.distributed:
        return [name]
    names: list[Any] = [None] * env.world_size
    dist.all_gather_object(names, name)
    return sorted(set(names))


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- the loop
@dataclass
class Trainer:
    """Everything one training run holds, including where it is (for checkpoints); ``fit`` drives it."""

    cfg: TrainConfig
    env: DistEnv
    model: torch.nn.Module  # the raw module: evaluation and saving use it
    wrapped: torch.nn.Module  # DDP(model) under a process group, else the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    batches: Any  # data.TensorBatches or data.LoaderBatches
    test_images: torch.Tensor
    test_labels: torch.Tensor
    stop: StopRequest = field(default_factory=StopRequest)
    # progress, saved in checkpoints:
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of that epoch already consumed
    global_step: int = 0  # optimizer steps so far
    train_seconds: float = 0.0  # training-loop seconds of the finished epochs
    epoch_seconds: float = 0.0  # training-loop seconds of the epoch in progress before a resume
    tracker_run_id: str | None = None  # experiment tracker's run id (from a checkpoint, or the live one)
    sums: TrainSums | None = None  # loss/correct/count of the epoch in progress
    epoch_started: float = 0.0  # perf_counter() when this process started the epoch in progress
    tracker: Tracker = field(default_factory=Tracker)  # wandb on rank 0, else a no-op
    transform: Any = None  # speed.BatchTransform (augmentation, channels_last) or None
    clock: Any = field(default_factory=speed.TargetClock)  # time to --target-accuracy

    def train_step(self, x: torch.Tensor, y: torch.Tensor, sums: TrainSums) -> torch.Tensor:
        with self.precision.autocast():
            logits = self.wrapped(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        self.precision.backward(loss)
        if self.cfg.grad_clip > 0:
            scaler.unscale_(self.optimizer)  # clip the true gradients, never the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.scheduler.step()
        self.global_step += 1
        sums.add(loss, logits, y)
        return loss

    def train_epoch(self, show_progress: bool = False) -> tuple[float, float, int, float]:
        """Train from ``step_in_epoch`` to the end of ``epoch``; returns (loss, accuracy, images, seconds)."""
        cfg, epoch, start_step = self.cfg, self.epoch, self.step_in_epoch
        self.model.train()
        if self.sums is None:
            self.sums = TrainSums(self.env.device)
        bar = progress_bar(len(self.batches) - start_step, f"epoch {epoch + 1}/{cfg.epochs}", show_progress)
        synchronize(self.env.device)
        self.clock.start_epoch()
        started = time.perf_counter()
        self.epoch_started = started
        for step, (x, y) in enumerate(self.batches.epoch(epoch, start_step), start=start_step):
            if self.finished:
                break
            if self.transform is not None:
                x = self.transform(x, epoch, step)
            loss = self.train_step(x, y, self.sums)
            self.step_in_epoch = step + 1
            if self.clock.due(self.global_step):
                self.clock.check(self, started)  # evaluates with the clock paused
            bar.update(1)
            self.tracker.log_step(self.global_step, loss, self.optimizer)  # syncs only when wandb is on
            if show_progress and (step + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            faults.maybe_fail("step", self.global_step)
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if self.global_step % cfg.stop_check_every == 0:
                self.stop_if_requested()
        synchronize(self.env.device)
        seconds = self.epoch_seconds + self.clock.end_epoch(time.perf_counter() - started)
        bar.close()
        self.stop_if_requested()
        loss, accuracy, images = self.sums.reduce(self.env)
        return loss, accuracy, images, seconds

    def end_epoch(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.epoch, self.step_in_epoch, self.epoch_seconds, self.sums = self.epoch + 1, 0, 0.0, None
        self.epoch_started = 0.0

    @property
    def total_steps(self) -> int:
        return planned_steps(self.cfg, len(self.batches))

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    def evaluate(self) -> EvalResult:
        speed.average_buffers(self.model, self.env)  # per-rank BatchNorm statistics -> one model
        return evaluate(self.model, self.test_images, self.test_labels, self.env,
                        self.cfg.eval_batch_size, self.precision.autocast())

    # ------------------------------------------------------------------ checkpoints and stopping
    def save_checkpoint(self) -> str | None:
        """Collective: every rank contributes its RNG state; rank 0 writes; all wait for the file."""
        env = self.env
        rng = gather_objects(checkpoint.rng_state(), env)
        sums = self.sums.sums.clone() if self.sums is not None else torch.zeros(3, dtype=torch.float64,
                                                                                   device=env.device)
        all_reduce_sum(sums, env)
        in_epoch = self.step_in_epoch > 0 and self.epoch_started > 0
        # this epoch's training seconds so far, without the clock's mid-epoch evaluation pauses
        elapsed = self.epoch_seconds + (time.perf_counter() - self.epoch_started - self.clock.paused
                                        if in_epoch else 0.0)
        path = None
        if env.is_main:
            state = {
                "format": checkpoint.FORMAT,
                "version": checkpoint.VERSION,
                "model": clean_state_dict(self.model.state_dict()),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.scaler.state_dict(),
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "train_seconds": self.train_seconds,
                "epoch_seconds": elapsed,
                "train_sums": sums.cpu(),
                "rng": rng,
                "config": self.cfg.to_json(),
                "world_size": env.world_size,
                "tracker_run_id": self.tracker_run_id,
                "target_clock": self.clock.state_dict(),
            }
            path = str(checkpoint.save(self.cfg.out_dir, state, self.cfg.keep))
        env.barrier()  # nobody leaves (or exits) before the file is complete
        return path

    def stop_if_requested(self) -> None:
        signum = self.stop.agreed(self.env)
        if not signum:
            return
        path = self.save_checkpoint()
        log(self.env, f"stopped by signal {signal_name(signum)} at epoch {self.epoch + 1} step "
                      f"{self.step_in_epoch} (global step {self.global_step}); checkpoint {path}; "
                      f"continue with --resume auto --out-dir {self.cfg.out_dir}")
        raise StopTraining(signum, path)

    def restore(self, state: dict[str, Any], source: str) -> None:
        cfg, env = self.cfg, self.env
        check_resume_compatible(cfg, env, state, source)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.epoch_seconds = float(state.get("epoch_seconds", 0.0)) if self.step_in_epoch else 0.0
        self.tracker_run_id = state.get("tracker_run_id")
        self.clock.load_state_dict(state.get("target_clock", {}))
        self.sums = TrainSums(env.device)
        if self.step_in_epoch and env.is_main:  # the saved sums are already the sum over ranks
            self.sums.sums.copy_(state["train_sums"].to(env.device))
        rngs = state["rng"]
        if env.rank < len(rngs):
            checkpoint.set_rng_state(rngs[env.rank])
        else:
            seed_everything(cfg.seed + env.rank + 1000 * self.epoch)


# Training flags that must not change between a checkpoint and its resume.
RESUME_KEYS = ("model", "batch_size", "epochs", "max_steps", "lr", "optimizer", "schedule", "seed",
               "normalize", "label_smoothing", "weight_decay")


def check_resume_compatible(cfg: TrainConfig, env: DistEnv, state: dict[str, Any], source: str) -> None:
    saved = state["config"]
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {getattr(cfg, k)})" for k in changed)
        raise UserError(f"checkpoint {source} was written with {detail}; resume with the same training flags")
    if state["world_size"] != env.world_size and int(state["step_in_epoch"]) != 0:
        raise UserError(
            f"checkpoint {source} was written mid-epoch at world size {state['world_size']}; resume it "
            f"with {state['world_size']} processes, or from an epoch-end checkpoint (any world size)"
        )


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def choose_resume_checkpoint(cfg: TrainConfig, env: DistEnv) -> str | None:
    """Rank 0 picks the checkpoint (or none) and every rank gets the same answer — or the same error."""
    choice: tuple[str | None, str | None] = (None, None)
    if env.is_main and cfg.resume:
        try:
            if cfg.resume == "auto":
                newest = checkpoint.newest_loadable(cfg.out_dir)
                choice = (str(newest) if newest else None, None)
            else:
                checkpoint.load(cfg.resume)
                choice = (cfg.resume, None)
        except UserError as exc:
            choice = (None, str(exc))
    path, error = broadcast_object(choice, env)
    if error:
        raise UserError(error)
    return path


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    full = steps_per_epoch * cfg.epochs
    return min(full, cfg.max_steps) if cfg.max_steps else full


def build_trainer(cfg: TrainConfig, env: DistEnv) -> Trainer:
    precision = resolve_precision(cfg.amp, env.device)  # fail on impossible --amp before any work
    seed_everything(cfg.seed)
    data.prepare(cfg.data_dir, env, cfg.download)
    train_u8, train_labels = data.load_split(cfg.data_dir, train=True)
    test_u8, test_labels = data.load_split(cfg.data_dir, train=False)
    device = env.device
    per_rank_batch = cfg.batch_size // env.world_size
    if per_rank_batch > len(train_labels) // env.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set")
    if cfg.loader == "tensor":
        batches: Any = data.TensorBatches(
            data.to_float(train_u8, cfg.normalize).to(device), train_labels.to(device), env,
            per_rank_batch, cfg.seed,
        )
    else:
        batches = data.LoaderBatches(cfg.data_dir, cfg.normalize, env, per_rank_batch, cfg.seed,
                                     cfg.num_workers)
    model = speed.prepare_model(build_model(cfg.model), cfg, env).to(device)
    wrapped = model
    if cfg.engine == "accelerate":  # accelerate places, wraps (DDP) and autocasts the model
        from .engine_accelerate import prepare_model

        wrapped, precision = prepare_model(env, model)
    elif env.distributed:
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    wrapped = speed.compile_model(wrapped, cfg)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, total_steps=planned_steps(cfg, len(batches)))
    return Trainer(
        cfg, env, model, wrapped, optimizer, scheduler, precision, batches,
        data.to_float(test_u8, cfg.normalize).to(device), test_labels.to(device),
        transform=speed.build_batch_transform(cfg, env, per_rank_batch, len(batches)),
        clock=speed.TargetClock(cfg.eval_every, cfg.target_accuracy),
    )


def run_metadata(trainer: Trainer) -> dict[str, Any]:
    cfg, env = trainer.cfg, trainer.env
    return {
        "config": cfg.to_json(),
        "world_size": env.world_size,
        "per_rank_batch": cfg.batch_size // env.world_size,
        "steps_per_epoch": len(trainer.batches),
        "backend": env.backend,
        "device": str(env.device),
        "amp": trainer.precision.name,
        "parameters": count_parameters(trainer.model),
        "torch_version": torch.__version__,
        "torchvision_version": _torchvision_version(),
        "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "hostnames": gather_hostnames(env),
        "python": sys.version.split()[0],
    }


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


def fit(cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    cfg.out_dir = broadcast_object(cfg.out_dir, env)  # ranks may have made different default names
    run = RunDir(cfg.out_dir, enabled=env.is_main)
    run.create()
    trainer = build_trainer(cfg, env)
    resume_from = choose_resume_checkpoint(cfg, env)
    if resume_from:
        trainer.restore(checkpoint.load(resume_from, map_location=env.device), resume_from)
        run.truncate_metrics(after_epoch=trainer.epoch)
        log(env, f"resumed from {resume_from} at epoch {trainer.epoch + 1} step {trainer.step_in_epoch} "
                 f"(global step {trainer.global_step})")
    elif cfg.resume == "auto":
        log(env, f"no checkpoint in {cfg.out_dir}/checkpoints: starting fresh")
    meta = run_metadata(trainer)  # a collective (hostnames): every rank calls it
    meta["resumed_from"] = resume_from
    run.write_config(meta)
    trainer.tracker = Tracker.start(cfg, env, meta, cfg.out_dir, resume_id=trainer.tracker_run_id)
    trainer.tracker_run_id = trainer.tracker.run_id
    log(env, f"run dir {cfg.out_dir}: model {cfg.model} ({meta['parameters']:,} parameters), "
             f"world size {env.world_size}, {env.device}, backend {env.backend or 'none'}, "
             f"amp {trainer.precision.name}, global batch {cfg.batch_size}")
    show_progress = env.is_main and cfg.progress and sys.stderr.isatty()
    warmup_seconds = speed.warm_up(trainer, cfg.warmup_steps)  # untimed; state restored after

    trainer.stop.install()
    try:
        test = train_epochs(trainer, run, show_progress)
    finally:
        trainer.stop.restore()

    summary = {
        "test_accuracy": test.accuracy,
        "test_correct": test.correct,
        "test_total": test.total,
        "test_loss": test.loss,
        "world_size": env.world_size,
        "train_seconds": trainer.train_seconds,
        "epochs": trainer.epoch,
        "global_step": trainer.global_step,
        "model": cfg.model,
        "recipe": cfg.recipe,
        "per_class_accuracy": test.class_accuracy,
        "per_class_correct": test.class_correct,
        "per_class_total": test.class_total,
    }
    summary.update(speed.summary_fields(trainer, warmup_seconds))
    run.save_weights(trainer.model)
    run.write_summary(summary)
    write_final_outputs(trainer, cfg.out_dir)  # pictures, confusion_matrix.json, model.pt2
    trainer.tracker.finish(summary, cfg.out_dir)
    log(env, f"done: test accuracy {test.accuracy:.2%} ({test.correct}/{test.total}) in "
             f"{trainer.train_seconds:.1f}s of training; summary in {run.path / 'summary.json'}")
    return summary


def train_epochs(trainer: Trainer, run: RunDir, show_progress: bool) -> EvalResult:
    """The epochs that remain: train, evaluate, record, checkpoint. Returns the final evaluation."""
    cfg, env = trainer.cfg, trainer.env
    test: EvalResult | None = None
    while trainer.epoch < cfg.epochs and not trainer.finished:
        epoch = trainer.epoch
        loss, accuracy, images, seconds = trainer.train_epoch(show_progress)
        test = trainer.evaluate()
        trainer.clock.epoch_evaluated(test.accuracy, trainer.train_seconds + seconds, trainer.global_step)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "train_accuracy": accuracy,
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "test_correct": test.correct,
            "test_total": test.total,
            "images_per_second": images / seconds if seconds > 0 else 0.0,
            "epoch_seconds": seconds,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "global_step": trainer.global_step,
        }
        run.append_metrics(record)
        trainer.tracker.log_epoch(record, trainer.global_step)
        log(env, f"epoch {epoch + 1}/{cfg.epochs}  train_loss {loss:.4f}  train_acc {accuracy:.2%}  "
                 f"test_loss {test.loss:.4f}  test_acc {test.accuracy:.2%} "
                 f"({test.correct}/{test.total})  {record['images_per_second']:,.0f} img/s  "
                 f"{seconds:.1f}s")
        trainer.end_epoch(seconds)
        trainer.save_checkpoint()
    return test if test is not None else trainer.evaluate()  # resumed after the last epoch


def dumps_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)
