"""Time to target: the training seconds until the test accuracy first reaches ``--target-accuracy``.

The clock is the training loop's own (synchronised, evaluation excluded): mid-epoch evaluations every
``--eval-every`` steps pause it; epoch-end evaluations happen outside it. Resolution: ``eval_every``
steps (or one epoch when 0). All ranks take the same decisions, because the accuracy comes from the
exact all_reduce evaluation. What it has recorded is part of every checkpoint (``state_dict``), so a
resumed run reports the time of the first run that reached the target, and the seconds of earlier
attempts count (the progress's ``train_seconds``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..dist import synchronize


class TargetClock:
    """Training seconds until the test accuracy first reaches the target."""

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

    def check(self, evaluate: Callable[[], Any], device: torch.device, seconds_before: float,
              epoch_started: float, global_step: int) -> tuple[Any, float]:
        """Mid-epoch: stop the clock, evaluate exactly, record, restart the clock. Returns the
        evaluation and the training seconds at it.

        ``seconds_before``: training seconds before this process started the epoch (finished epochs
        plus this epoch's seconds before a resume); ``epoch_started``: perf_counter() at that start.
        """
        synchronize(device)
        now = time.perf_counter()
        train_seconds = seconds_before + (now - epoch_started - self.paused)
        result = evaluate()
        self.evaluations += 1
        self._record(result.accuracy, train_seconds, global_step)
        self.paused += time.perf_counter() - now
        return result, train_seconds

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

    def summary(self) -> dict[str, Any]:
        """summary.json's time-to-target keys."""
        return {
            "target_accuracy": self.target,
            "seconds_to_target": self.seconds,
            "steps_to_target": self.steps,
            "accuracy_at_target": self.accuracy,
            "reached_target_unix": self.reached_unix,
            "mid_epoch_evaluations": self.evaluations,
        }
