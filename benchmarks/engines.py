"""DDP or FSDP2: throughput and peak memory per rank, at 1 and 2 ranks (a figure, not a test).

    MNIST_DATA_DIR=../shared/data python benchmarks/engines.py [--world-sizes 1,2] [--steps 234] [--repeats 3]
    MNIST_DATA_DIR=../shared/data python benchmarks/engines.py --tiny       # plumbing check only

Every cell is real ``torchrun --nproc_per_node=N train_ddp.py --engine E`` processes (gloo on the CPU,
NCCL where CUDA is; one rank runs under torchrun too, since fsdp2 needs a process group), the default
recipe (model ``fast``, global batch 256) for ``--steps`` optimizer steps (default 234, one epoch of
the real MNIST), the cells interleaved and each repeated ``--repeats`` times:

* images/s: the training images of the run / the training loop's synchronised seconds
  (``metrics.jsonl`` ``images_per_second``): the best and the median of the repeats, and every run
  (on a shared machine other work only ever slows a run down, so the best is the least disturbed);
* peak memory per rank: ``metrics.jsonl`` ``peak_memory_mb_per_rank`` (on the CPU each rank's peak
  resident set size during the epoch; on CUDA ``max_memory_allocated``), the largest rank, median
  over the repeats;
* fsdp2 with ``--no-reshard-after-forward`` at the largest world size, as a third engine row.

Prints a Markdown table with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cell(out: Path, nproc: int, engine: str, extra: list[str], steps: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train_ddp.py"), "--engine", engine, *extra, "--out-dir", str(out), "--max-steps", str(steps),
           "--threads", str(threads), "--no-progress", "--no-plots", "--no-export", "--skip-network-check"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line][-1]
    summary = json.loads((out / "summary.json").read_text())
    return {"images_per_second": last["images_per_second"], "peak_mb": max(last["peak_memory_mb_per_rank"]),
            "memory_kind": last["memory_kind"], "test_accuracy": summary["test_accuracy"]}


def cells(world_sizes: list[int]) -> list[tuple[str, list[str], int]]:
    """(engine label, its flags, ranks) of every cell, in the order they are measured."""
    out: list[tuple[str, list[str], int]] = [(engine, [], n) for n in world_sizes for engine in ("ddp", "fsdp2")]
    out.append(("fsdp2 --no-reshard-after-forward", ["--no-reshard-after-forward"], max(world_sizes)))
    return out


def measure(args: argparse.Namespace, tmp: Path) -> list[dict]:
    grid = cells(args.world_sizes)
    samples: dict[int, list[dict]] = {i: [] for i in range(len(grid))}
    for repeat in range(args.repeats):  # interleaved: a slow minute of a shared machine hits every cell
        for i, (label, extra, n) in enumerate(grid):
            threads = max(1, args.cores // n)  # the job's default: usable cores // ranks on the node
            engine = label.split()[0]
            samples[i].append(run_cell(tmp / f"{i}-{repeat}", n, engine, extra, args.steps, threads))
            print(f"{label}, {n} rank(s), run {repeat + 1}: {samples[i][-1]['images_per_second']:,.0f} img/s, "
                  f"{samples[i][-1]['peak_mb']:,.0f} MB", flush=True)
    rows = []
    for i, (label, _, n) in enumerate(grid):
        runs = samples[i]
        rows.append({"engine": label, "ranks": n, "threads": max(1, args.cores // n),
                     "images_per_second": statistics.median(r["images_per_second"] for r in runs),
                     "images_per_second_best": max(r["images_per_second"] for r in runs),
                     "images_per_second_runs": [r["images_per_second"] for r in runs],
                     "peak_mb": statistics.median(r["peak_mb"] for r in runs), "memory_kind": runs[0]["memory_kind"],
                     "test_accuracy": statistics.median(r["test_accuracy"] for r in runs)})
    return rows


def table(rows: list[dict], machine: str, command: str) -> str:
    lines = [f"Engines on {machine}; `{command}`, {datetime.date.today().isoformat()}", "",
             "| engine | ranks × threads | images/s, best | median | every run | peak memory per rank, MB | "
             "test accuracy |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        runs = ", ".join(f"{v:,.0f}" for v in r["images_per_second_runs"])
        lines.append(f"| {r['engine']} | {r['ranks']} × {r['threads']} | {r['images_per_second_best']:,.0f} | "
                     f"{r['images_per_second']:,.0f} | {runs} | "
                     f"{r['peak_mb']:,.0f} | {r['test_accuracy']:.2%} |")
    lines += ["", f"memory: {rows[0]['memory_kind']} (the largest rank's)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--steps", type=int, default=234, help="optimizer steps per run (234: one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (the median is shown)")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--tiny", action="store_true", help="20 steps, one run per cell: plumbing only")
    args = parser.parse_args()
    if not os.environ.get("MNIST_DATA_DIR"):
        sys.exit("error: set MNIST_DATA_DIR to a directory holding MNIST/raw")
    import torch

    cuda = torch.cuda.is_available()
    args.world_sizes = [int(x) for x in args.world_sizes.split(",")]
    if args.tiny:
        args.steps, args.repeats = 20, 1
    if cuda:
        args.world_sizes = [n for n in args.world_sizes if n <= torch.cuda.device_count()]
    args.cores = len(os.sched_getaffinity(0))
    machine = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)} (NCCL)" if cuda else
               f"{args.cores} CPU cores (gloo), torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    command = "python benchmarks/engines.py " + " ".join(sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n" + table(rows, machine, command.strip()))


if __name__ == "__main__":
    main()
