"""Warm-up: untimed training steps (compilation, autotuning), then every piece of state put back.

The model, optimizer, scheduler, GradScaler, RNG and step counter return exactly to where they were,
so the timed run is the run that would have happened without the warm-up.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from ..dist import synchronize
from .evaluate import TrainSums


def warm_up(trainer: Any, steps: int) -> float:
    """Run ``steps`` untimed training steps, then restore every piece of state. Returns seconds."""
    if steps <= 0:
        return 0.0
    device = trainer.env.device
    scaler = trainer.engine.precision.scaler
    saved = {
        "model": copy.deepcopy(trainer.model.state_dict()),
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "scaler": copy.deepcopy(scaler.state_dict()),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "global_step": trainer.progress.global_step,
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
        scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["cpu_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)
    trainer.progress.global_step = saved["global_step"]
    trainer.engine.skipped_steps.zero_()  # the warm-up's skipped fp16 steps are not the run's
    return seconds
