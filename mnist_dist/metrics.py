"""Exact metrics across ranks: every rank sums, one all_reduce(SUM) combines, nothing is averaged.

Evaluation splits the test set into contiguous disjoint shards (no padding, no duplicates), so the
result covers exactly N images at every world size, including those that do not divide N. The
training sums (loss, correct, count) are kept on the device and read once per epoch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .data.batches import eval_shard
from .data.mnist import NUM_CLASSES
from .dist import DistEnv, all_reduce_sum, gather_objects

MiB = 2 ** 20


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy over every evaluated image
    correct: int
    total: int
    class_correct: list[int]
    class_total: list[int]
    shard: slice = field(default_factory=lambda: slice(0, 0))  # this rank's part of the test set
    predicted: torch.Tensor | None = field(default=None, repr=False)  # its predicted classes (device)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def class_accuracy(self) -> dict[str, float]:
        return {str(c): (k / n if n else 0.0) for c, (k, n) in enumerate(zip(self.class_correct, self.class_total))}


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, env: DistEnv,
             batch_size: int = 1000, autocast: contextlib.AbstractContextManager | None = None) -> EvalResult:
    """Exact evaluation. Call on EVERY rank with the raw module (not the DDP wrapper); every rank calls
    its forward equally often."""
    shard = eval_shard(len(labels), env.rank, env.world_size)
    x, y = images[shard], labels[shard]
    device = images.device
    # [loss_sum, correct, count, class_correct x10, class_total x10]; float64 keeps counts exact
    sums = torch.zeros(3 + 2 * NUM_CLASSES, dtype=torch.float64, device=device)
    predicted = torch.empty(len(y), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    # as many batches on every rank as on the largest shard (shards differ by one image at most): an
    # FSDP2 module's forward is a collective; a rank's batches past its shard are empty, add nothing
    for start in range(0, -(-len(labels) // env.world_size), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with autocast or contextlib.nullcontext():
            logits = model(xb)
        logits = logits.float()
        predicted[start:start + batch_size] = logits.argmax(dim=1)
        hit = predicted[start:start + batch_size] == yb
        sums[0] += F.cross_entropy(logits, yb, reduction="sum").double()
        sums[1] += hit.sum()
        sums[2] += len(yb)
        sums[3:3 + NUM_CLASSES] += torch.bincount(yb[hit], minlength=NUM_CLASSES)
        sums[3 + NUM_CLASSES:] += torch.bincount(yb, minlength=NUM_CLASSES)
    model.train(was_training)
    all_reduce_sum(sums, env)
    s = sums.cpu().tolist()
    total = int(round(s[2]))
    return EvalResult(
        loss=s[0] / total if total else 0.0,
        correct=int(round(s[1])),
        total=total,
        class_correct=[int(round(v)) for v in s[3:3 + NUM_CLASSES]],
        class_total=[int(round(v)) for v in s[3 + NUM_CLASSES:]],
        shard=shard,
        predicted=predicted,
    )


class TrainSums:
    """Loss / correct / count summed on the device during an epoch; read (and reduced) once."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def load(self, sums: torch.Tensor) -> None:
        self.sums.copy_(sums.to(self.sums.device))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.numel()
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += (logits.detach().argmax(dim=1) == labels).sum()
        self.sums[2] += n

    def reduce(self, env: DistEnv) -> tuple[float, float, int]:
        """(mean loss, accuracy, images) over all ranks; one collective, one host sync."""
        s = all_reduce_sum(self.sums.clone(), env).cpu().tolist()
        count = int(round(s[2]))
        return (s[0] / count if count else 0.0), (s[1] / count if count else 0.0), count


@torch.no_grad()
def average_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over ranks, in place.

    Per-rank BatchNorm (the CPU path): DDP broadcasts rank 0's buffers at the start of every forward
    (``broadcast_buffers``, its default), then each rank updates them from its own batch, so the
    running statistics follow rank 0's batches and the ranks end an epoch differing by their last
    batch's update. Averaging them before evaluation and export gives every rank the same model.
    One all_reduce of a flat tensor; a no-op without a process group or floating buffers.
    """
    if not env.distributed:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    all_reduce_sum(flat, env)
    flat /= env.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset: offset + b.numel()].view_as(b))
        offset += b.numel()


def final_predictions(result: EvalResult, n: int, env: DistEnv) -> torch.Tensor:
    """Every test image's predicted class, on every rank, from an evaluation's per-rank predictions:
    one all_reduce(SUM) of disjoint shards, no second forward pass."""
    predicted = torch.zeros(n, dtype=torch.int64, device=result.predicted.device)
    predicted[result.shard] = result.predicted
    return all_reduce_sum(predicted, env).cpu()


# ----------------------------------------------------------------------------- an epoch's resources
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


class Resources:
    """What an epoch cost besides its seconds, without a host sync (two ``perf_counter`` calls per
    step): the **data wait** (seconds inside the batch iterator) and the **peak memory** (CUDA's
    ``max_memory_allocated``; on the CPU the peak resident set size, reset at each epoch start through
    ``/proc/self/clear_refs`` where Linux allows it, else since the process started)."""

    def __init__(self) -> None:
        self.data_wait = 0.0
        self.mark_data: Callable[[], Any] | None = None  # --profile's marker while it records
        self._reset_ok = False

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

    def epoch_record(self, env: DistEnv, epoch_seconds: float) -> dict[str, Any]:
        """The epoch's memory and data-wait keys for metrics.jsonl (every rank's, gathered: a
        collective)."""
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
