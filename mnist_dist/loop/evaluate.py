"""Exact metrics across ranks: every rank sums, one all_reduce(SUM) combines, nothing is averaged.

Evaluation splits the test set into contiguous disjoint shards (no padding, no duplicates), so the
result covers exactly N images at every world size, including those that do not divide N.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.batches import eval_shard
from ..data.mnist import NUM_CLASSES
from ..dist import DistEnv, all_reduce_sum


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
    """Exact evaluation. Call on EVERY rank with the raw module (not the DDP wrapper)."""
    shard = eval_shard(len(labels), env.rank, env.world_size)
    x, y = images[shard], labels[shard]
    device = images.device
    # [loss_sum, correct, count, class_correct x10, class_total x10]; float64 keeps counts exact
    sums = torch.zeros(3 + 2 * NUM_CLASSES, dtype=torch.float64, device=device)
    predicted = torch.empty(len(y), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    for start in range(0, len(y), batch_size):
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

    @classmethod
    def of(cls, sums: torch.Tensor) -> "TrainSums":
        """Sums that already exist (e.g. summed over ranks for a checkpoint)."""
        out = cls.__new__(cls)
        out.sums = sums
        return out

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
