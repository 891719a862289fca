"""One recipe over several seeds: test accuracy and training seconds per seed, the median and the worst
(figures, not a test). Every run is a real `train_ddp.py` process, one after the other, so on an idle
machine each has all its cores.

    MNIST_DATA_DIR=../shared/data python benchmarks/recipe_seeds.py --seeds 0-4 -- --recipe best
    MNIST_DATA_DIR=../shared/data python benchmarks/recipe_seeds.py --seeds 0-4 -- --config sweeps/best-recipe-v1.toml

Everything after `--` goes to `train_ddp.py` (plus `--seed S` and, through `cpu_baseline.run_job`,
`--out-dir ... --no-progress --no-plots --no-export`). `--goal-min`, `--goal-median` and
`--goal-seconds` print whether the recipe meets the best recipe's goal (every seed >= 99.6%,
median >= 99.65%, <= 200 s of training).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from cpu_baseline import run_job  # this folder is on sys.path when a script in it runs


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,3,7' -> the seeds."""
    try:
        if "-" in text:
            low, high = (int(part) for part in text.split("-", 1))
            seeds = list(range(low, high + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds look like 0-4 or 0,3,7, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-4"), help="e.g. 0-4 or 0,3,7")
    parser.add_argument("--goal-min", type=float, default=0.996, help="every seed at least this accuracy")
    parser.add_argument("--goal-median", type=float, default=0.9965, help="median at least this accuracy")
    parser.add_argument("--goal-seconds", type=float, default=200.0, help="every seed within these training seconds")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train_ddp.py's flags")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not os.environ.get("MNIST_DATA_DIR"):
        sys.exit("error: set MNIST_DATA_DIR to a directory holding MNIST/raw")

    print(f"train_ddp.py {' '.join(train_args)}  (seeds {', '.join(map(str, args.seeds))})", flush=True)
    print(f"{'seed':>4s} {'test acc':>9s} {'correct':>8s} {'epochs':>6s} {'train s':>8s}  after each epoch (%)",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            s = run_job(Path(tmp) / f"seed-{seed}", *train_args, "--seed", str(seed))
            rows.append(s)
            curve = " ".join(f"{100 * a:.2f}" for a in s["per_epoch_test_accuracy"])
            print(f"{seed:4d} {s['test_accuracy']:9.2%} {s['test_correct']:8d} {s['epochs']:6d} "
                  f"{s['train_seconds']:8.1f}  {curve}", flush=True)
    accs = [r["test_accuracy"] for r in rows]
    secs = [r["train_seconds"] for r in rows]
    median, worst, slowest = statistics.median(accs), min(accs), max(secs)
    print(f"median {median:.2%}, worst {worst:.2%}, best {max(accs):.2%}; training median "
          f"{statistics.median(secs):.1f} s, slowest {slowest:.1f} s")
    print(f"goal: every seed >= {args.goal_min:.2%}: {'yes' if worst >= args.goal_min else 'NO'}; "
          f"median >= {args.goal_median:.2%}: {'yes' if median >= args.goal_median else 'NO'}; "
          f"<= {args.goal_seconds:.0f} s: {'yes' if slowest <= args.goal_seconds else 'NO'}")


if __name__ == "__main__":
    main()
