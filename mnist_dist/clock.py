"""The run's clock: every training second is counted here, and only here.

Training seconds are the training loop's own (synchronised with the device): an epoch's clock runs
from its first batch to its last step; mid-epoch evaluations (every ``--eval-every`` steps) pause it,
and epoch-end evaluation, checkpoints and outputs happen outside it. A resumed run continues the
seconds of the attempts before it (its checkpoint holds them), and so does the time to target: the
training seconds until the test accuracy first reaches ``--target-accuracy`` (resolution:
``eval_every`` steps, else one epoch).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .dist import synchronize


class RunClock:
    def __init__(self, every: int = 0, target: float = 1.0) -> None:
        self.every, self.target = every, target
        self.train_seconds = 0.0  # the finished epochs
        self.epoch_before = 0.0  # the epoch in progress: its seconds before this process (a resume)
        self.started = 0.0  # perf_counter() when this process started the epoch; 0 outside an epoch
        self.paused = 0.0  # mid-epoch evaluation seconds since then
        self.warmup_seconds = 0.0  # untimed warm-up steps before the run
        self.evaluations = 0  # mid-epoch evaluations (every --eval-every steps)
        self.seconds: float | None = None  # time to target: training seconds, step, accuracy, when
        self.steps: int | None = None
        self.accuracy: float | None = None
        self.reached_unix: float | None = None

    def start_epoch(self, device: torch.device) -> None:
        synchronize(device)
        self.started, self.paused = time.perf_counter(), 0.0

    def epoch_seconds(self) -> float:
        """The training seconds of the epoch in progress so far."""
        running = time.perf_counter() - self.started - self.paused if self.started else 0.0
        return self.epoch_before + running

    def stop_epoch(self, device: torch.device) -> float:
        """The epoch's last step is done: its training seconds, frozen."""
        synchronize(device)
        self.epoch_before, self.started = self.epoch_seconds(), 0.0
        return self.epoch_before

    def end_epoch(self) -> None:
        """After the epoch-end evaluation and records: its seconds join the finished epochs."""
        self.train_seconds += self.epoch_before
        self.epoch_before = 0.0

    def total(self) -> float:
        return self.train_seconds + self.epoch_seconds()

    # ------------------------------------------------------------------ time to target
    def evaluation_due(self, global_step: int) -> bool:
        return bool(self.every) and self.seconds is None and global_step % self.every == 0

    def paused_for(self, evaluate: Callable[[], Any], device: torch.device, global_step: int) -> tuple[Any, float]:
        """Mid-epoch: stop the clock, ``evaluate()``, record, restart. (The result, the seconds at it.)"""
        synchronize(device)
        now = time.perf_counter()
        seconds = self.total()
        result = evaluate()
        self.evaluations += 1
        self.evaluated(result.accuracy, seconds, global_step)
        self.paused += time.perf_counter() - now
        return result, seconds

    def evaluated(self, accuracy: float, train_seconds: float, global_step: int) -> None:
        if self.seconds is None and accuracy >= self.target:
            self.seconds, self.steps, self.accuracy = train_seconds, global_step, accuracy
            self.reached_unix = time.time()

    # ------------------------------------------------------------------ checkpoints and summary
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's time keys (``epoch_seconds``: the epoch in progress, so far)."""
        return {"train_seconds": self.train_seconds, "epoch_seconds": self.epoch_seconds(),
                "target_clock": {"evaluations": self.evaluations, "seconds": self.seconds, "steps": self.steps,
                                 "accuracy": self.accuracy, "reached_unix": self.reached_unix}}

    def load_state_dict(self, state: dict[str, Any], mid_epoch: bool) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.epoch_before = float(state.get("epoch_seconds", 0.0)) if mid_epoch else 0.0
        self.started = self.paused = 0.0
        target = state.get("target_clock", {})
        self.evaluations = int(target.get("evaluations", 0))
        self.seconds, self.steps = target.get("seconds"), target.get("steps")
        self.accuracy, self.reached_unix = target.get("accuracy"), target.get("reached_unix")

    def summary(self) -> dict[str, Any]:
        """summary.json's time keys."""
        return {"train_seconds": self.train_seconds, "target_accuracy": self.target,
                "seconds_to_target": self.seconds, "steps_to_target": self.steps,
                "accuracy_at_target": self.accuracy, "reached_target_unix": self.reached_unix,
                "mid_epoch_evaluations": self.evaluations, "warmup_seconds": self.warmup_seconds}
