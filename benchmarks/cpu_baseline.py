"""CPU figures for the README, in one invocation on one machine (figures, not a test).

    MNIST_DATA_DIR=../shared/data python benchmarks/cpu_baseline.py [--seeds 3] [--skip-notebook]

1. The original notebook pipeline: DataLoader + ToTensor + the seed CNN, Adam 1e-4, batch 128,
   7 epochs (`--recipe seed --loader dataloader --num-workers 0`).
2. Our default recipe (one epoch, data held as tensors), over several seeds (median reported).
3. Throughput of 1 rank x 2 threads vs 2 ranks x 1 thread (torchrun, gloo), same global batch.
4. Start-up and epilogue: the README's `python train_ddp.py` as a whole process (pictures and
   model.pt2 included), its wall time against its own train_seconds (target: whole process <= 2x),
   and when its result line (`done: ...`) appeared. `--only-startup` runs just this part.

Every run is a real `train_ddp.py` process; figures come from its summary.json / metrics.jsonl.
Training seconds exclude start-up and evaluation (the loop is timed with synchronisation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(out: Path, *args: str, nproc: int = 0) -> dict:
    """One quiet ``train_ddp.py`` run in ``out``: its summary.json, plus the mean ``images_per_second``
    and ``per_epoch_test_accuracy`` from metrics.jsonl (also used by ``recipe_seeds.py``)."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(REPO / "train_ddp.py"), "--no-progress", "--no-plots", "--no-export",
           "--out-dir", str(out), *args]
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:  # its error line is on stderr above
        sys.exit(f"error: {' '.join(cmd[1:])} failed")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    summary["images_per_second"] = statistics.mean(m["images_per_second"] for m in metrics)
    summary["per_epoch_test_accuracy"] = [m["test_accuracy"] for m in metrics]
    return summary


def run_whole_process(out: Path) -> dict:
    """The README's default command, timed from process start to exit (nothing skipped)."""
    cmd = [sys.executable, str(REPO / "train_ddp.py"), "--no-progress", "--out-dir", str(out)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result_line_s = None
    for line in proc.stdout:
        if line.startswith("done:") and result_line_s is None:
            result_line_s = time.perf_counter() - started
    if proc.wait() != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit {proc.returncode}")
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "result_line_s": result_line_s, "train_s": summary["train_seconds"],
            "ratio": wall / summary["train_seconds"], "test_accuracy": summary["test_accuracy"]}


def startup(runs: int, tmp: Path) -> None:
    rows = [run_whole_process(tmp / f"whole{i}") for i in range(runs)]
    print(f"\n{'whole process (python train_ddp.py)':38s} {'wall s':>7s} {'result s':>9s} {'train s':>8s} {'ratio':>6s}")
    for i, r in enumerate(rows):
        print(f"{'run ' + str(i):38s} {r['wall_s']:7.1f} {r['result_line_s']:9.1f} {r['train_s']:8.1f} "
              f"{r['ratio']:6.2f}")
    print(f"median whole process / train_seconds: {statistics.median(r['ratio'] for r in rows):.2f}x "
          f"(target <= 2x; pictures and model.pt2 included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the default recipe")
    parser.add_argument("--skip-notebook", action="store_true", help="skip the ~3.5 min notebook run")
    parser.add_argument("--startup-runs", type=int, default=3, help="whole-process runs for part 4")
    parser.add_argument("--only-startup", action="store_true", help="run part 4 only")
    args = parser.parse_args()
    if not os.environ.get("MNIST_DATA_DIR"):
        sys.exit("set MNIST_DATA_DIR to a directory holding MNIST/raw")
    if args.only_startup:
        with tempfile.TemporaryDirectory() as tmp:
            startup(args.startup_runs, Path(tmp))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        notebook = None
        if not args.skip_notebook:
            notebook = run_job(tmp / "notebook", "--recipe", "seed", "--loader", "dataloader",
                               "--num-workers", "0")
            rows.append(("notebook pipeline (seed CNN, DataLoader, 7 ep)", notebook))
        fast = [run_job(tmp / f"fast{s}", "--seed", str(s)) for s in range(args.seeds)]
        for s, r in enumerate(fast):
            rows.append((f"default recipe, seed {s} (1 epoch)", r))
        one_by_two = run_job(tmp / "1x2", "--threads", "2")
        two_by_one = run_job(tmp / "2x1", nproc=2)
        startup(args.startup_runs, tmp)

    print(f"\n{'run':52s} {'train s':>8s} {'test acc':>9s} {'img/s':>8s}")
    for name, r in rows:
        print(f"{name:52s} {r['train_seconds']:8.1f} {r['test_accuracy']:9.2%} {r['images_per_second']:8.0f}")
    med_acc = statistics.median(r["test_accuracy"] for r in fast)
    med_s = statistics.median(r["train_seconds"] for r in fast)
    print(f"\ndefault recipe: median test accuracy {med_acc:.2%}, median training {med_s:.1f} s")
    if notebook:
        print(f"notebook / default training time: {notebook['train_seconds'] / med_s:.1f}x "
              f"(target >= 20x); notebook accuracy {notebook['test_accuracy']:.2%} (target >= 97.9%)")
    ratio = two_by_one["images_per_second"] / one_by_two["images_per_second"]
    print(f"throughput: 1 rank x 2 threads {one_by_two['images_per_second']:.0f} img/s, "
          f"2 ranks x 1 thread {two_by_one['images_per_second']:.0f} img/s -> {ratio:.2f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
