"""One prepared GPU benchmark for a single borrowed GPU (<= 8 minutes). Checks, then figures.

    MNIST_DATA_DIR=/path/to/data python benchmarks/gpu.py --out-file gpu_results.md

Checks (each row says PASS/FAIL and why):
  * first the `gpu` test suite, ``pytest -m gpu tests/test_gpu.py`` (one row per test): bf16/fp16
    training to >= 99%, bf16 -> fp16 resume, no host sync in 20 training batches under
    ``torch.cuda.set_sync_debug_mode("error")`` after warm-up and after a resume (default and best
    recipe), --compile default / reduce-overhead, export of a CUDA-trained model, --deterministic
    bit-identical resume, two ranks sharing the GPU over gloo (DDP on CUDA, exact evaluation, the
    stop flag);
  * bf16 AMP and fp16 AMP runs: finite train/test loss, GradScaler enabled for fp16 (scale reported),
    test accuracy >= 99% after the default recipe's one epoch;
  * NCCL at world size 1: ``torchrun --standalone --nproc_per_node=1 train_ddp.py --backend nccl``,
    under the ddp engine and under ``--engine fsdp2`` (bf16 through FSDP2's MixedPrecisionPolicy).
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
        # the same run under --engine fsdp2: fully_shard over a one-GPU mesh, bf16 by FSDP2's
        # MixedPrecisionPolicy (bf16 parameters and all-gathers, fp32 gradient reduction) instead of autocast
        Job("fast eager bf16, fsdp2 torchrun nccl x1", [*fast, "--amp", "bf16", "--backend", "nccl", "--engine",
                                                        "fsdp2"], nproc=1, min_accuracy=0.99,
            expect={"backend": "nccl", "world_size": 1, "amp": "bf16"}),
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


def run_gpu_suite(timeout: float) -> list[dict]:
    """``pytest -m gpu`` on tests/test_gpu.py; one row per test (PASS / FAIL / SKIP and why)."""
    # -o addopts=: one process (the suite's `-n auto` would start a worker per core, all on one GPU,
    # and needs pytest-xdist, which a borrowed machine may not have)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts=",
           str(REPO / "tests" / "test_gpu.py")]
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return [{"name": "gpu test suite", "status": "FAIL", "why": f"timed out after {timeout:.0f}s",
                 "command": " ".join(cmd[1:]), "wall_s": time.time() - started}]
    rows = []
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            test, _, why = rest.partition(" - ")
            status = {"PASSED": "PASS", "SKIPPED": "SKIP"}.get(word, "FAIL")
            rows.append({"name": "test " + test.split("::")[-1], "status": status, "why": why[:200]})
    if proc.returncode not in (0, 5) and not any(r["status"] == "FAIL" for r in rows):
        rows.append({"name": "gpu test suite", "status": "FAIL",
                     "why": f"exit {proc.returncode}: {proc.stdout.strip()[-300:]}"})
    rows.append({"name": "gpu test suite (total)", "status": "PASS" if proc.returncode == 0 else "FAIL",
                 "why": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "",
                 "wall_s": time.time() - started})
    return rows


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
    parser.add_argument("--suite-timeout", type=float, default=300, help="seconds for the gpu test suite")
    parser.add_argument("--skip-suite", action="store_true", help="figures only, without the gpu test suite")
    args = parser.parse_args()

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
    if not args.cpu_dry_run and not args.skip_suite:
        rows += run_gpu_suite(args.suite_timeout)
        print(f"[{time.time() - started:5.0f}s] gpu test suite: {rows[-1]['why']}", flush=True)
    for job in plan(args.cpu_dry_run, args.skip_compile):
        if time.time() - started > args.budget:
            rows.append({"name": job.name, "status": "SKIP", "why": f"over the {args.budget:.0f}s budget"})
            continue
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
