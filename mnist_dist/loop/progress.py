"""Where a run is: the loop's own state that every checkpoint carries, in one dataclass.

``state_dict`` / ``load_state_dict`` are a symmetric pair over the same keys, which are the
top-level keys of the checkpoint format, so version-1 checkpoints (written before this class
existed) load unchanged; version 2 added ``world_sizes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .clock import TargetClock
from .evaluate import TrainSums


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of that epoch already consumed
    global_step: int = 0  # optimizer steps so far
    train_seconds: float = 0.0  # training-loop seconds of the finished epochs
    epoch_seconds: float = 0.0  # training-loop seconds of the epoch in progress before this process
    sums: TrainSums | None = None  # loss/correct/count of the epoch in progress (this rank's)
    clock: TargetClock = field(default_factory=TargetClock)  # time to --target-accuracy
    tracker_run_id: str | None = None  # experiment tracker's run id, so a resumed job continues it
    world_sizes: list[int] = field(default_factory=list)  # the world sizes the run went through, in order

    def joined_at(self, world_size: int) -> None:
        """Record the world size this (re)start runs at."""
        if not self.world_sizes or self.world_sizes[-1] != world_size:
            self.world_sizes.append(world_size)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys. Callers store the sums over ALL ranks (see checkpoint.state.capture)."""
        sums = self.sums.sums if self.sums is not None else torch.zeros(3, dtype=torch.float64)
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "train_seconds": self.train_seconds,
            "epoch_seconds": self.epoch_seconds,
            "train_sums": sums.detach().cpu(),
            "tracker_run_id": self.tracker_run_id,
            "target_clock": self.clock.state_dict(),
            "world_sizes": list(self.world_sizes),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device, holds_sums: bool) -> None:
        """``holds_sums``: this rank takes the saved (already summed over ranks) epoch sums; the
        other ranks start from zero, so the next all_reduce counts them once."""
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.epoch_seconds = float(state.get("epoch_seconds", 0.0)) if self.step_in_epoch else 0.0
        self.tracker_run_id = state.get("tracker_run_id")
        self.clock.load_state_dict(state.get("target_clock", {}))
        self.world_sizes = [int(w) for w in state.get("world_sizes", [state["world_size"]])]
        self.sums = TrainSums(device)
        if self.step_in_epoch and holds_sums:
            self.sums.sums.copy_(state["train_sums"].to(device))

    def end_epoch(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.epoch, self.step_in_epoch, self.epoch_seconds, self.sums = self.epoch + 1, 0, 0.0, None
