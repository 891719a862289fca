"""Reading small device values on the host without draining the CUDA pipeline.

A ``.item()`` on a CUDA tensor waits for every kernel queued before it. The loop reads two small
values periodically (the ranks' agreed stop signal, the fp16 steps the GradScaler skipped), and a
decision taken a check later is as good: ``LaggedRead.exchange`` copies this check's value into
pinned host memory asynchronously (with an event) and returns what the PREVIOUS check copied, long
finished by then. On the CPU there is no pipeline: it returns this check's value at once.
"""

from __future__ import annotations

import torch


class LaggedRead:
    def __init__(self, device: torch.device, size: int = 1) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=self.cuda)
        self.event: torch.cuda.Event | None = None
        self.last: list[int] | None = None  # the newest value that reached the host

    def exchange(self, value: torch.Tensor) -> list[int] | None:
        """Submit ``value`` (int64 on the device); the previous submission's value (None the first
        time on CUDA; this one's on the CPU)."""
        if not self.cuda:
            self.last = value.tolist()
            return self.last
        previous = self.collect()
        self.host.copy_(value, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return previous

    def collect(self) -> list[int] | None:
        """The newest submitted value on the host (waits only if its copy has not finished)."""
        if self.event is not None:
            if not self.event.query():
                self.event.synchronize()  # rare: the host is more than a check ahead of the GPU
            self.last = self.host.tolist()
            self.event = None
        return self.last
