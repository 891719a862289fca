"""Scaling with the number of ranks, strong and weak (a figure, not a test).

    MNIST_DATA_DIR=../shared/data python benchmarks/scaling.py [--world-sizes 1,2,4] [--steps 120]
    MNIST_DATA_DIR=../shared/data python benchmarks/scaling.py --tiny       # plumbing check only

Every cell is real ``torchrun --nproc_per_node=N train_ddp.py`` processes (gloo on the CPU; NCCL
where CUDA is, with N <= the GPUs), the default recipe for ``--steps`` optimizer steps:

* strong scaling: the global batch is fixed (``--global-batch``, default 256): N ranks split it;
* weak scaling: the per-rank batch is fixed (``--per-rank-batch``, default 128): the global batch
  grows with N.

Columns: images/s (training images / the training loop's synchronised seconds, ``metrics.jsonl``);
speedup vs 1 rank; efficiency = speedup / the hardware's growth (N on GPUs, one per rank; on the CPU
every layout shares the same cores, so the ideal speedup is 1 and efficiency = speedup); and, from a
second run of the cell with ``--profile`` (10 steps skipped, 5 warm-up, 20 recorded), the step time
and the share of it that the backward pass spends waiting for the gradient all_reduce
(``summary.json`` ``profile.mean.allreduce_wait_share``, averaged over ranks).

Writes ``scaling.md`` (the table) and ``scaling.png`` into ``--out-dir`` (default
``runs/scaling-<time>``) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cell(out: Path, nproc: int, batch: int, steps: int, threads: int, profile: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train_ddp.py"), "--out-dir", str(out), "--batch-size", str(batch), "--max-steps", str(steps),
           "--threads", str(threads), "--no-progress", "--no-plots", "--no-export", "--skip-network-check"]
    if profile:
        cmd += ["--profile", "--profile-steps", "10,5,20"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((out / "summary.json").read_text())
    return {"images_per_second": metrics[-1]["images_per_second"], "profile": summary.get("profile", {})}


def measure(args: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    for mode in ("strong", "weak"):
        for n in args.world_sizes:
            batch = args.global_batch if mode == "strong" else args.per_rank_batch * n
            if batch % n:
                continue
            base = tmp / f"{mode}-{n}"
            threads = max(1, args.cores // n)  # the job's default: usable cores // ranks on the node
            speed = run_cell(base, n, batch, args.steps, threads, profile=False)
            prof = run_cell(Path(f"{base}-profile"), n, batch, max(args.steps, 36), threads, profile=True)["profile"]
            mean = prof.get("mean", {})
            rows.append({"mode": mode, "ranks": n, "threads": threads, "global_batch": batch, "per_rank_batch": batch // n,
                         "images_per_second": speed["images_per_second"], "step_ms": mean.get("step_ms"),
                         "allreduce_wait_ms": mean.get("allreduce_wait_ms"),
                         "allreduce_wait_share": mean.get("allreduce_wait_share")})
            print(f"{mode} {n} rank(s): {speed['images_per_second']:,.0f} img/s", flush=True)
    return rows


def add_ratios(rows: list[dict], cuda: bool) -> None:
    for row in rows:
        one = next(r for r in rows if r["mode"] == row["mode"] and r["ranks"] == min(
            x["ranks"] for x in rows if x["mode"] == row["mode"]))
        row["speedup"] = row["images_per_second"] / one["images_per_second"]
        growth = row["ranks"] / one["ranks"] if cuda else 1.0
        row["efficiency"] = row["speedup"] / growth


def table(rows: list[dict], machine: str) -> str:
    lines = [f"Scaling on {machine}", "",
             "| scaling | ranks × threads | global batch | per-rank batch | images/s | speedup vs 1 rank | "
             "efficiency | step ms | all_reduce wait ms | all_reduce share of step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fmt = (lambda v, f: f.format(v) if v is not None else "-")
        lines.append(f"| {r['mode']} | {r['ranks']} × {r['threads']} | {r['global_batch']} | {r['per_rank_batch']} | "
                     f"{r['images_per_second']:,.0f} | {r['speedup']:.2f}x | {r['efficiency']:.0%} | "
                     f"{fmt(r['step_ms'], '{:.1f}')} | {fmt(r['allreduce_wait_ms'], '{:.1f}')} | "
                     f"{fmt(r['allreduce_wait_share'], '{:.0%}')} |")
    return "\n".join(lines) + "\n"


def picture(rows: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, marker in (("strong", "o"), ("weak", "s")):
        part = [r for r in rows if r["mode"] == mode]
        xs = [r["ranks"] for r in part]
        left.plot(xs, [r["images_per_second"] for r in part], marker=marker, label=f"{mode} scaling")
        shares = [100 * (r["allreduce_wait_share"] or 0) for r in part]
        right.plot(xs, shares, marker=marker, label=f"{mode} scaling")
    left.set(xlabel="ranks", ylabel="training images/s", title="throughput")
    right.set(xlabel="ranks", ylabel="% of step time", title="waiting for the gradient all_reduce")
    for ax in (left, right):
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(machine)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2,4", help="comma-separated rank counts")
    parser.add_argument("--global-batch", type=int, default=256, help="strong scaling's fixed global batch")
    parser.add_argument("--per-rank-batch", type=int, default=128, help="weak scaling's fixed per-rank batch")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per throughput run")
    parser.add_argument("--out-dir", default="", help="where scaling.md / scaling.png go")
    parser.add_argument("--tiny", action="store_true", help="36 steps, world sizes 1,2: plumbing only")
    args = parser.parse_args()
    if not os.environ.get("MNIST_DATA_DIR"):
        sys.exit("error: set MNIST_DATA_DIR to a directory holding MNIST/raw")
    import torch

    cuda = torch.cuda.is_available()
    sizes = [int(x) for x in args.world_sizes.split(",")]
    if args.tiny:
        sizes, args.steps = [1, 2], 36
    if cuda:
        sizes = [n for n in sizes if n <= torch.cuda.device_count()]
    args.world_sizes = sizes
    args.cores = len(os.sched_getaffinity(0))
    machine = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)} (NCCL)" if cuda else
               f"{len(os.sched_getaffinity(0))} CPU cores (gloo), torch {torch.__version__}")
    out = Path(args.out_dir or f"runs/scaling-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    add_ratios(rows, cuda)
    text = table(rows, machine)
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    picture(rows, out / "scaling.png", machine)
    print("\n" + text + f"\nwritten: {out / 'scaling.md'}, {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
