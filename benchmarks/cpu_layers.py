"""Why `--recipe best` uses a pool-first network in channels_last: the seconds of one
training step (forward, backward, Adam) of each candidate network and layout on random batches, and
of the 2x2 max-pool alone, on this machine's CPU threads. Figures, not a test.

    python benchmarks/cpu_layers.py [--threads 2] [--batch 256] [--steps 40]

An epoch is 234 such steps at batch 256; a real epoch (`train_ddp.py --epochs 1`) adds augmentation,
the per-epoch evaluation is not in it. docs/performance.md has the figures of real epochs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mnist_dist

from mnist_dist.models import BestCNN, PoolFirstCNN  # noqa: E402

CANDIDATES = {
    "best (conv-BN-ReLU-pool, 32/48/96)": BestCNN,
    "pool first, 32/48/96": lambda: PoolFirstCNN((32, 48, 96)),
    "best2 (pool first, 32/64/128)": PoolFirstCNN,
}


def seconds_per_step(model: torch.nn.Module, batch: int, steps: int, channels_last: bool) -> float:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        optimizer.step()

    for _ in range(5):  # warm-up: oneDNN primitive caches, allocator
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def pool_seconds(batch: int, channels_last: bool, repeats: int = 20) -> tuple[float, float]:
    """(forward, forward + backward) seconds of a 2x2 max-pool of the first block's [B, 32, 24, 24] map."""
    x = torch.randn(batch, 32, 24, 24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.ones(batch, 32, 12, 12)
    for _ in range(3):
        F.max_pool2d(x, 2).backward(grad)
    start = time.perf_counter()
    for _ in range(repeats):
        F.max_pool2d(x, 2)
    forward = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        F.max_pool2d(x, 2).backward(grad)
    return forward, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if min(args.threads, args.batch, args.steps) < 1:
        sys.exit("error: --threads, --batch and --steps must be positive")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    steps_per_epoch = 60_000 // args.batch  # training drops the last partial batch
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.steps} timed steps")
    print(f"{'network':38s} {'layout':14s} {'ms/step':>8s} {'s/epoch':>8s}")
    for name, build in CANDIDATES.items():
        for channels_last in (False, True):
            seconds = seconds_per_step(build(), args.batch, args.steps, channels_last)
            layout = "channels_last" if channels_last else "NCHW"
            print(f"{name:38s} {layout:14s} {1000 * seconds:8.1f} {seconds * steps_per_epoch:8.1f}", flush=True)
    for channels_last in (False, True):
        forward, both = pool_seconds(args.batch, channels_last)
        layout = "channels_last" if channels_last else "NCHW"
        print(f"max_pool2d 2x2 of [{args.batch}, 32, 24, 24], {layout}: forward {1000 * forward:.1f} ms, "
              f"forward + backward {1000 * both:.1f} ms")


if __name__ == "__main__":
    main()
