"""What a checkpoint costs the training loop: the full format, DCP, and DCP written asynchronously.

    MNIST_DATA_DIR=../shared/data python benchmarks/checkpoint_save.py [--nproc 2] [--repeats 3]

Trains ``--max-steps 40`` at ``--nproc`` ranks (torchrun, gloo on the CPU) without periodic checkpoints
and with one every 2 steps (20 saves) in each format, and prints the training seconds (the loop's own
clock, which periodic checkpoints are inside of: the time the ranks were held) and the extra seconds
per save, medians over ``--repeats`` runs. The async figure is what the loop waits for (staging the
state, and the previous save when the next one comes), not the write itself.
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
FORMATS = {"no periodic checkpoint": [], "full (rank 0 writes one file)": ["--checkpoint-every", "2"],
           "dcp (every rank writes its shards)": ["--checkpoint-every", "2", "--checkpoint-format", "dcp"],
           "dcp --async-checkpoint": ["--checkpoint-every", "2", "--checkpoint-format", "dcp",
                                      "--async-checkpoint"]}


def train_seconds(nproc: int, flags: list[str], data: str, port: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", str(REPO / "train_ddp.py"),
               "--data-dir", data, "--out-dir", f"{tmp}/run", "--max-steps", "40", "--keep", "2",
               "--no-progress", "--no-plots", "--no-export", *flags]
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        return json.loads(Path(f"{tmp}/run/summary.json").read_text())["train_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "../shared/data"))
    args = parser.parse_args()
    seconds = {name: [] for name in FORMATS}
    for repeat in range(args.repeats):  # interleaved, so that a slow moment of the machine hits all
        for i, (name, flags) in enumerate(FORMATS.items()):
            seconds[name].append(train_seconds(args.nproc, flags, args.data_dir, 29700 + 10 * repeat + i))
    base = statistics.median(seconds["no periodic checkpoint"])
    print(f"{args.nproc} ranks, 40 steps, 20 saves; median of {args.repeats}:")
    print(f"{'':38} {'training s':>10} {'per save':>10}")
    for name, values in seconds.items():
        median = statistics.median(values)
        extra = "" if name.startswith("no ") else f"{(median - base) / 20 * 1000:8.1f} ms"
        print(f"{name:38} {median:10.2f} {extra:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
