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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import data
from .config import TrainConfig
from .dist import DistEnv
from .errors import UserError
from .metrics import EvalResult, TrainSums, evaluate
from .models import build_model, count_parameters
from .outputs import RunDir


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
    """Everything one training run holds; ``fit`` drives it."""

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
    global_step: int = 0

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

    def train_epoch(self, epoch: int, start_step: int = 0, show_progress: bool = False):
        self.model.train()
        sums = TrainSums(self.env.device)
        bar = progress_bar(len(self.batches) - start_step, f"epoch {epoch + 1}/{self.cfg.epochs}",
                           show_progress)
        synchronize(self.env.device)
        started = time.perf_counter()
        for step, (x, y) in enumerate(self.batches.epoch(epoch, start_step), start=start_step):
            if self.finished:
                break
            loss = self.train_step(x, y, sums)
            bar.update(1)
            if show_progress and (step + 1) % self.cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        synchronize(self.env.device)
        seconds = time.perf_counter() - started
        bar.close()
        loss, accuracy, images = sums.reduce(self.env)
        return loss, accuracy, images, seconds

    @property
    def total_steps(self) -> int:
        return planned_steps(self.cfg, len(self.batches))

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    def evaluate(self) -> EvalResult:
        return evaluate(self.model, self.test_images, self.test_labels, self.env,
                        self.cfg.eval_batch_size, self.precision.autocast())


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
    model = build_model(cfg.model).to(device)
    wrapped = model
    if cfg.engine == "accelerate":  # accelerate places, wraps (DDP) and autocasts the model
        from .engine_accelerate import prepare_model

        wrapped, precision = prepare_model(env, model)
    elif env.distributed:
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, total_steps=planned_steps(cfg, len(batches)))
    return Trainer(
        cfg, env, model, wrapped, optimizer, scheduler, precision, batches,
        data.to_float(test_u8, cfg.normalize).to(device), test_labels.to(device),
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
    run = RunDir(cfg.out_dir, enabled=env.is_main)
    run.create()
    trainer = build_trainer(cfg, env)
    meta = run_metadata(trainer)  # a collective (hostnames): every rank calls it
    run.write_config(meta)
    log(env, f"run dir {cfg.out_dir}: model {cfg.model} ({meta['parameters']:,} parameters), "
             f"world size {env.world_size}, {env.device}, backend {env.backend or 'none'}, "
             f"amp {trainer.precision.name}, global batch {cfg.batch_size}")
    show_progress = env.is_main and cfg.progress and sys.stderr.isatty()

    train_seconds = 0.0
    test: EvalResult | None = None
    for epoch in range(cfg.epochs):
        if trainer.finished:
            break
        loss, accuracy, images, seconds = trainer.train_epoch(epoch, 0, show_progress)
        train_seconds += seconds
        test = trainer.evaluate()
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
        }
        run.append_metrics(record)
        log(env, f"epoch {epoch + 1}/{cfg.epochs}  train_loss {loss:.4f}  train_acc {accuracy:.2%}  "
                 f"test_loss {test.loss:.4f}  test_acc {test.accuracy:.2%} "
                 f"({test.correct}/{test.total})  {record['images_per_second']:,.0f} img/s  "
                 f"{seconds:.1f}s")

    assert test is not None
    summary = {
        "test_accuracy": test.accuracy,
        "test_correct": test.correct,
        "test_total": test.total,
        "test_loss": test.loss,
        "world_size": env.world_size,
        "train_seconds": train_seconds,
        "epochs": cfg.epochs,
        "model": cfg.model,
        "recipe": cfg.recipe,
        "per_class_accuracy": test.class_accuracy,
        "per_class_correct": test.class_correct,
        "per_class_total": test.class_total,
    }
    run.save_weights(trainer.model)
    run.write_summary(summary)
    log(env, f"done: test accuracy {test.accuracy:.2%} ({test.correct}/{test.total}) in "
             f"{train_seconds:.1f}s of training; summary in {run.path / 'summary.json'}")
    return summary


def dumps_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)
