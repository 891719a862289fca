"""What an epoch cost besides its seconds, and the opt-in per-step observers (--profile, --tensorboard).

Always on, without a host sync (two ``perf_counter`` calls per step):

* **data wait**: the seconds the loop spent inside the batch iterator waiting for its next batch;
  the epoch record gets the slowest rank's wait (``data_wait_seconds``) and the rest of the epoch's
  training seconds (``compute_seconds``: forward, backward with its all_reduce, optimizer);
* **peak memory** of the epoch: CUDA's ``max_memory_allocated`` on a GPU; on the CPU the process's
  peak resident set size, reset at each epoch start through ``/proc/self/clear_refs`` (Linux; where
  that is refused, the peak since the process started, ``memory_kind`` says which).

One ``all_gather_object`` at the epoch end collects every rank's numbers (``*_per_rank``).
Observers get ``after_step`` / ``log_epoch`` / ``summary`` (a collective) / ``finish`` (rank 0).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import torch

from ..dist import DistEnv, gather_objects

MiB = 2 ** 20


def reset_peak_memory(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "reset the peak resident set size to the current one" (proc(5))
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, reset_ok: bool) -> tuple[float, str]:
    """(bytes, kind) of this process's peak memory since the last reset."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:
        return 0.0, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    return rss, "peak_rss" if reset_ok else "peak_rss_since_start"


class Monitor:
    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.data_wait = 0.0
        self.mark_data: Callable[[], Any] | None = None  # --profile's marker while it records
        self._reset_ok = False

    def start(self, cfg: Any, trainer: Any, meta: dict[str, Any], resumed: bool) -> None:
        """The observers the flags ask for (none by default)."""
        if cfg.profile:
            from .profile import StepProfiler

            self.observers.append(StepProfiler(cfg, trainer, self))
        if cfg.tensorboard and trainer.env.is_main:
            from ..outputs.tensorboard import TensorBoard

            step = trainer.progress.global_step
            self.observers.append(TensorBoard.start(cfg, meta, purge_step=step + 1 if resumed else None))

    # ------------------------------------------------------------------ the loop's calls
    def start_epoch(self, device: torch.device) -> None:
        self.data_wait = 0.0
        self._reset_ok = reset_peak_memory(device)

    def batches(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """``iterable``'s items, timing how long each took to arrive."""
        iterator, clock = iter(iterable), time.perf_counter
        while True:
            start = clock()
            try:
                if self.mark_data is None:
                    item = next(iterator)
                else:
                    with self.mark_data():
                        item = next(iterator)
            except StopIteration:
                return
            self.data_wait += clock() - start
            yield item

    def after_step(self, global_step: int, loss: torch.Tensor, optimizer: Any) -> None:
        for observer in self.observers:
            observer.after_step(global_step, loss, optimizer)

    def epoch_record(self, env: DistEnv, epoch_seconds: float) -> dict[str, Any]:
        """The epoch's memory and data-wait keys for metrics.jsonl. A collective: every rank calls it."""
        peak, kind = peak_memory(env.device, self._reset_ok)
        rows = gather_objects((peak, self.data_wait), env)
        waits = [w for _, w in rows]
        wait = max(waits)
        return {
            "peak_memory_mb": max(p for p, _ in rows) / MiB,
            "peak_memory_mb_per_rank": [p / MiB for p, _ in rows],
            "memory_kind": kind,
            "data_wait_seconds": wait,
            "data_wait_seconds_per_rank": waits,
            "compute_seconds": max(0.0, epoch_seconds - wait),
            "data_wait_fraction": wait / epoch_seconds if epoch_seconds > 0 else 0.0,
        }

    def log_epoch(self, record: dict[str, Any], global_step: int) -> None:
        for observer in self.observers:
            observer.log_epoch(record, global_step)

    def summary(self, env: DistEnv) -> dict[str, Any]:
        """summary.json keys from the observers (``profile``). A collective: every rank calls it."""
        out: dict[str, Any] = {}
        for observer in self.observers:
            out.update(observer.summary(env))
        return out

    def finish(self, summary: dict[str, Any], meta: dict[str, Any]) -> None:
        """Rank 0, after the final outputs exist (the pictures)."""
        for observer in self.observers:
            observer.finish(summary, meta)
