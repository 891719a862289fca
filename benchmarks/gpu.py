"""One prepared GPU benchmark for a single borrowed GPU (~5-8 minutes). Checks, then figures.

    MNIST_DATA_DIR=/path/to/data python benchmarks/gpu.py --out-file gpu_results.md

Checks (each row says PASS/FAIL and why):
  * bf16 AMP and fp16 AMP: finite train/test loss, GradScaler enabled for fp16 (scale reported),
    test accuracy >= 99% after the default recipe's one epoch;
  * NCCL at world size 1: ``torchrun --standalone --nproc_per_node=1 train_ddp.py --backend nccl``;
  * no host-device synchronisation inside the training step: 20 steps under
    ``torch.cuda.set_sync_debug_mode("error")`` (bf16, and the best recipe with augmentation);
    fp16 is reported for information (GradScaler.step reads its inf flag on the host).
Figures (each a real ``train_ddp.py`` process):
  * time to 99% test accuracy, training loop only after ``--warmup-steps`` untimed steps (evaluation
    every 10 steps, clock paused), and end to end (process launch -> the evaluation that first
    showed >= 99%, so Python start, CUDA init, data loading, compilation and warm-up are included);
  * images/s for the seed and default models, eager vs ``--compile`` (and CUDA graphs via
    ``--compile-mode reduce-overhead`` for the default model);
  * the best recipe (compiled, bf16): time to 99.5% and its final accuracy.
One table at the end, also written to ``--out-file`` (Markdown) and ``--out-file``.json (rows).

Without CUDA it stops with a clear message; ``--cpu-dry-run`` runs the same plan on the CPU with a
few steps per run (NCCL -> gloo, fp16 skipped, no sync check) to test the script's plumbing only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train_ddp.py")


@dataclass
class Job:
    name: str
    args: list[str]
    nproc: int = 0  # 0 = plain python, else torchrun --standalone --nproc_per_node
    min_accuracy: float = 0.0  # check: final test accuracy at least this
    expect: dict = field(default_factory=dict)  # check: summary/config keys that must equal values


def plan(dry_run: bool, skip_compile: bool) -> list[Job]:
    fast = ["--recipe", "fast", "--eval-every", "10", "--target-accuracy", "0.99", "--warmup-steps", "20",
            "--cudnn-benchmark"]
    jobs = [
        Job("fast eager bf16 (AMP check)", [*fast, "--amp", "bf16"], min_accuracy=0.99,
            expect={"amp": "bf16", "grad_scaler_enabled": False}),
        Job("fast eager fp16 (AMP check)", [*fast, "--amp", "fp16"], min_accuracy=0.99,
            expect={"amp": "fp16", "grad_scaler_enabled": True}),
        Job("fast eager bf16, torchrun nccl x1", [*fast, "--amp", "bf16", "--backend", "nccl"], nproc=1,
            min_accuracy=0.99, expect={"backend": "nccl", "world_size": 1}),
        Job("fast eager bf16 channels_last", [*fast, "--amp", "bf16", "--channels-last"], min_accuracy=0.99),
        Job("fast compiled bf16", [*fast, "--amp", "bf16", "--compile"], min_accuracy=0.99),
        Job("fast compiled bf16 cudagraphs", [*fast, "--amp", "bf16", "--compile", "--compile-mode",
                                              "reduce-overhead"], min_accuracy=0.99),
        Job("seed eager bf16 (2 epochs)", ["--recipe", "seed", "--epochs", "2", "--amp", "bf16",
                                            "--warmup-steps", "20", "--cudnn-benchmark"]),
        Job("seed compiled bf16 (2 epochs)", ["--recipe", "seed", "--epochs", "2", "--amp", "bf16",
                                               "--warmup-steps", "20", "--cudnn-benchmark", "--compile"]),
        Job("best compiled bf16 (to 99.5%)", ["--recipe", "best", "--amp", "bf16", "--compile",
                                               "--channels-last", "--cudnn-benchmark", "--warmup-steps", "20",
                                               "--eval-every", "50", "--target-accuracy", "0.995"],
            min_accuracy=0.996),
    ]
    if skip_compile:
        jobs = [j for j in jobs if "--compile" not in j.args]
    if dry_run:  # the same plan on the CPU, a few steps each: tests the plumbing, not the figures
        cpu_jobs = []
        for j in jobs:
            if "fp16" in j.args or "reduce-overhead" in j.args:
                continue
            args = [a for a in j.args if a != "--cudnn-benchmark"]
            args = ["gloo" if a == "nccl" else a for a in args]
            cpu_jobs.append(Job(j.name + " [cpu dry run]", [*args, "--device", "cpu", "--max-steps", "12",
                                                              "--warmup-steps", "2", "--epochs", "1"],
                                j.nproc, 0.0, {k: ("gloo" if v == "nccl" else v) for k, v in j.expect.items()}))
        jobs = cpu_jobs
    return jobs


def run_job(job: Job, tmp: Path, data_dir: str, timeout: float) -> dict:
    out = tmp / job.name.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "").replace(",", "")
    launcher = [sys.executable]
    if job.nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.nproc}"]
    cmd = [*launcher, TRAIN, "--no-progress", "--data-dir", data_dir, "--out-dir", str(out), *job.args]
    row: dict = {"name": job.name, "command": " ".join(cmd[1:] if not job.nproc else cmd)}
    launched = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(status="FAIL", why=f"timed out after {timeout:.0f}s")
        return row
    row["wall_s"] = time.time() - launched
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        row.update(status="FAIL", why=f"exit {proc.returncode}: {' | '.join(tail)[-300:]}")
        return row
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    row.update(
        accuracy=summary["test_accuracy"], target=summary.get("target_accuracy"),
        loop_s_to_target=summary.get("seconds_to_target"),
        e2e_s_to_target=(summary["reached_target_unix"] - launched) if summary.get("reached_target_unix") else None,
        train_s=summary["train_seconds"], images_per_s=max(m["images_per_second"] for m in metrics),
        amp=summary.get("amp"), grad_scale=summary.get("grad_scale"), device=config.get("device"),
    )
    problems = []
    losses = [m["train_loss"] for m in metrics] + [m["test_loss"] for m in metrics]
    if not all(math.isfinite(v) for v in losses):
        problems.append(f"non-finite loss {losses}")
    if summary["test_accuracy"] < job.min_accuracy:
        problems.append(f"accuracy {summary['test_accuracy']:.4f} < {job.min_accuracy}")
    for key, want in job.expect.items():
        got = summary.get(key, config.get(key))
        if got != want:
            problems.append(f"{key}={got!r}, expected {want!r}")
    if summary.get("grad_scaler_enabled") and summary.get("grad_scale") in (None, 1.0):
        problems.append("GradScaler enabled but scale is 1")
    row.update(status="FAIL" if problems else "PASS", why="; ".join(problems))
    return row


def sync_check(train_args: list[str]) -> None:
    """In this process: warm up, then 20 train steps with sync debug mode 'error'. Prints JSON."""
    import torch

    sys.path.insert(0, str(REPO))
    from mnist_dist.cli import parse_train_args, setup_engine
    from mnist_dist.loop.evaluate import TrainSums
    from mnist_dist.loop.warmup import warm_up
    from mnist_dist.train import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_train_args([*train_args, "--out-dir", tmp, "--no-progress"])
        engine = setup_engine(cfg)
        env = engine.env
        trainer = build_trainer(cfg, engine)
        warm_up(trainer, 5)
        sums = TrainSums(env.device)
        batches = trainer.batches.epoch(0)
        x, y = next(batches)  # builds this epoch's order on the device (one copy per epoch)
        if trainer.transform is not None:
            trainer.transform.epoch_params(0)  # one draw per epoch, outside the steps
        torch.cuda.synchronize()
        result = {"sync_free": True, "why": ""}
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(1, 21):
                x, y = next(batches)
                if trainer.transform is not None:
                    x = trainer.transform(x, 0, step)
                trainer.train_step(x, y, sums)
        except RuntimeError as exc:
            result = {"sync_free": False, "why": " ".join(str(exc).split())[:200]}
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        print(json.dumps(result))


def run_sync_check(name: str, args: list[str], data_dir: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--sync-check", "--", "--data-dir", data_dir, *args]
    row: dict = {"name": name, "command": " ".join(cmd[1:])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "FAIL", "why": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**row, "status": "FAIL", "why": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    result = json.loads(lines[-1])
    informational = "fp16" in args
    status = "PASS" if result["sync_free"] else ("INFO" if informational else "FAIL")
    return {**row, "status": status, "why": result["why"] or "no sync in 20 steps"}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| run | check | img/s | s to target (loop) | s to target (e2e) | target | final acc | wall s | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['status']} | {fmt(r.get('images_per_s'), ',.0f')} | "
            f"{fmt(r.get('loop_s_to_target'), '.3f')} | {fmt(r.get('e2e_s_to_target'), '.1f')} | "
            f"{fmt(r.get('target'), '.3f')} | {fmt(r.get('accuracy'), '.4f')} | {fmt(r.get('wall_s'), '.1f')} | "
            f"{r.get('why', '')}{' scale=' + format(r['grad_scale'], 'g') if r.get('grad_scale') else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-file", default="gpu_results.md", help="Markdown table (+ .json rows)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per run before it counts as failed")
    parser.add_argument("--budget", type=float, default=480, help="skip the remaining runs after this many seconds")
    parser.add_argument("--cpu-dry-run", action="store_true", help="plumbing test on the CPU (no figures)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile runs")
    parser.add_argument("--sync-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sync_check:
        return sync_check(args.train_args)

    import torch

    data_dir = os.environ.get("MNIST_DATA_DIR")
    if not data_dir:
        sys.exit("error: set MNIST_DATA_DIR to a directory holding MNIST/raw")
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        sys.exit("error: no CUDA device visible; this benchmark needs one GPU "
                 "(use --cpu-dry-run to test the script's plumbing on the CPU)")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run, no figures)"
    header = (f"GPU benchmark on {card}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)

    started = time.time()
    rows: list[dict] = []
    jobs: list = []
    if not args.cpu_dry_run:
        fast = ["--recipe", "fast", "--amp", "bf16", "--cudnn-benchmark"]
        jobs += [("sync check: fast bf16 step", fast), ("sync check: best bf16 step (augment, SyncBN n/a)",
                 ["--recipe", "best", "--amp", "bf16", "--channels-last", "--cudnn-benchmark"]),
                 ("sync check: fast fp16 step (info)", ["--recipe", "fast", "--amp", "fp16"])]
    jobs += plan(args.cpu_dry_run, args.skip_compile)
    for job in jobs:
        if time.time() - started > args.budget:
            name = job[0] if isinstance(job, tuple) else job.name
            rows.append({"name": name, "status": "SKIP", "why": f"over the {args.budget:.0f}s budget"})
            continue
        if isinstance(job, tuple):
            row = run_sync_check(job[0], job[1], data_dir, args.timeout)
        else:
            row = run_job(job, Path(tempfile.mkdtemp(prefix="gpu-bench-")), data_dir, args.timeout)
        rows.append(row)
        print(f"[{time.time() - started:5.0f}s] {row['status']:4s} {row['name']}: {row.get('why', '')}", flush=True)

    text = table(rows, header)
    print("\n" + text)
    Path(args.out_file).write_text(text + "\n")
    Path(args.out_file + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwritten: {args.out_file} and {args.out_file}.json")
    if any(r["status"] == "FAIL" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
