"""CPU speed side by side, in one run: 1 rank x 2 threads vs 2 ranks x 1 thread, each with the
device-resident tensor loader and with the classic DataLoader (figures, not a test).

    MNIST_DATA_DIR=../shared/data python benchmarks/cpu_speed.py [--repeats 3] [--eval-every 25]
    MNIST_DATA_DIR=../shared/data python benchmarks/cpu_speed.py --tiny     # plumbing check only

Every cell is a real ``train_ddp.py`` process (the default recipe: one epoch, global batch 256, so
every layout does the same optimizer steps on the same global batches).

* images/s: training images of the epoch / the training loop's seconds (synchronised; the
  mid-epoch evaluations below are excluded from the clock).
* seconds to 99%: the loop's training seconds until the first evaluation that shows >= 99% test
  accuracy. Evaluations run every ``--eval-every`` optimizer steps on all 10,000 test images (exact,
  all_reduce) with the clock paused, so the figure has a resolution of ``--eval-every`` steps and
  contains no evaluation time. "-" = never reached in that run.
With ``--repeats N`` each cell is the median of N runs (seeds 0..N-1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = (("1 rank x 2 threads", 0, 2), ("2 ranks x 1 thread", 2, 1))
LOADERS = (("tensor (device-resident)", ["--loader", "tensor"]),
           ("DataLoader", ["--loader", "dataloader"]))


def run_cell(out: Path, nproc: int, threads: int, loader_args: list[str], extra: list[str]) -> dict:
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(REPO / "train_ddp.py"), "--no-progress", "--out-dir", str(out),
           "--threads", str(threads), *loader_args, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "images_per_second": statistics.mean(m["images_per_second"] for m in metrics),
        "seconds_to_target": summary.get("seconds_to_target"),
        "test_accuracy": summary["test_accuracy"],
        "train_seconds": summary["train_seconds"],
    }


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (seeds 0..N-1), median shown")
    parser.add_argument("--eval-every", type=int, default=25, help="optimizer steps between evaluations")
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to time")
    parser.add_argument("--tiny", action="store_true", help="20 steps per run: checks the plumbing only")
    args = parser.parse_args()
    if not os.environ.get("MNIST_DATA_DIR"):
        sys.exit("error: set MNIST_DATA_DIR to a directory holding MNIST/raw")

    extra = ["--eval-every", str(args.eval_every), "--target-accuracy", str(args.target)]
    if args.tiny:
        extra += ["--max-steps", "20"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for loader_name, loader_args in LOADERS:
            for layout_name, nproc, threads in LAYOUTS:
                runs = [run_cell(Path(tmp) / f"{loader_args[1]}-{nproc}-{threads}-{seed}", nproc, threads,
                                 loader_args, [*extra, "--seed", str(seed)])
                        for seed in range(args.repeats)]
                rows.append((loader_name, layout_name, runs))
                print(f"done: {loader_name}, {layout_name}", flush=True)

    print(f"\n{'loader':26s} {'layout':20s} {'img/s':>8s} {'s to ' + format(args.target, '.0%'):>9s} "
          f"{'train s':>8s} {'test acc':>9s}")
    for loader_name, layout_name, runs in rows:
        ips = statistics.median(r["images_per_second"] for r in runs)
        t = median_or_none([r["seconds_to_target"] for r in runs])
        print(f"{loader_name:26s} {layout_name:20s} {ips:8.0f} {('-' if t is None else f'{t:.1f}'):>9s} "
              f"{statistics.median(r['train_seconds'] for r in runs):8.1f} "
              f"{statistics.median(r['test_accuracy'] for r in runs):9.2%}")
    if args.tiny:
        print("\n(--tiny: 20 steps per run; these numbers are not figures)")


if __name__ == "__main__":
    main()
