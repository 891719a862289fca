"""Do two checkouts train the same? Weights and metrics, bit for bit, over seven configurations.

    MNIST_DATA_DIR=../shared/data python benchmarks/same_results.py --before ../old-checkout --after .

For a refactor that promises unchanged behaviour: each checkout trains the same seven runs (one
process and torchrun at 2 ranks; default, best, seed recipes; checkpoints, gradient accumulation,
warm-up, bf16 autocast, the accelerate engine) on the real MNIST (30 steps) or its first 6,000/1,000
images, and the script compares the sha256 of ``model.pt``, the summary's test loss and count, every
metrics.jsonl and evaluations.jsonl number, the checkpoint names and the summary's keys. Prints one
line per run and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

QUIET = ["--no-progress", "--no-plots", "--no-export"]


def torchrun(n: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]


def cases(real: str, small: str) -> dict[str, tuple[list[str], list[str]]]:
    return {
        "default, real MNIST, 30 steps": ([], ["--data-dir", real, "--max-steps", "30", "--eval-every", "10"]),
        "2 ranks, checkpoints": (torchrun(2, 29611), ["--data-dir", small, "--batch-size", "400", "--epochs", "2",
                                                      "--checkpoint-every", "5"]),
        "best recipe (augment)": ([], ["--data-dir", small, "--recipe", "best", "--max-steps", "12"]),
        "seed recipe, sgd, grad-accum 2": ([], ["--data-dir", small, "--recipe", "seed", "--optimizer", "sgd",
                                                "--lr", "0.05", "--grad-accum", "2", "--max-steps", "15",
                                                "--batch-size", "64"]),
        "2 ranks, best (BatchNorm)": (torchrun(2, 29612), ["--data-dir", small, "--recipe", "best",
                                                           "--max-steps", "10"]),
        "warm-up, bf16, label smoothing": ([], ["--data-dir", small, "--amp", "bf16", "--warmup-steps", "3",
                                                "--max-steps", "10", "--label-smoothing", "0.1"]),
        "accelerate, 2 ranks, grad-accum 2": (torchrun(2, 29613), ["--data-dir", small, "--engine", "accelerate",
                                                                   "--max-steps", "12", "--grad-accum", "2"]),
    }


def small_mnist(real: str, root: Path) -> str:
    """The first 6,000 training and 1,000 test images of the real MNIST (IDX headers rewritten)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, n in (("train", 6000), ("t10k", 1000)):
        for kind, header, size in (("images-idx3-ubyte", 16, 784), ("labels-idx1-ubyte", 8, 1)):
            data = (Path(real) / "MNIST" / "raw" / f"{name}-{kind}").read_bytes()
            head = bytearray(data[:header])
            head[4:8] = n.to_bytes(4, "big")
            (raw / f"{name}-{kind}").write_bytes(bytes(head) + data[header:header + n * size])
    return str(root)


def outcome(tree: Path, launcher: list[str], flags: list[str], work: Path) -> dict:
    out = work / "run"
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               MNIST_DIST_ALLOW_SUBSET="1", WANDB_MODE="offline")
    cmd = (launcher or [sys.executable]) + [str(tree / "train_ddp.py"), *flags, *QUIET, "--out-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree, timeout=900)
    if proc.returncode:
        return {"error": proc.stderr[-1000:]}
    weights = torch.load(out / "model.pt", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].numpy().tobytes())
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = out / "evaluations.jsonl"
    evaluations = [json.loads(line) for line in evals.read_text().splitlines()] if evals.exists() else []
    return {"weights": digest.hexdigest(), "test_loss": summary["test_loss"], "test_correct": summary["test_correct"],
            "global_step": summary["global_step"], "summary_keys": sorted(summary),
            "train": [(m["train_loss"], m["train_accuracy"], m["test_loss"]) for m in metrics],
            "evaluations": [(e["global_step"], e["test_correct"], e["test_loss"]) for e in evaluations],
            "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("*.pt"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout (the reference)")
    parser.add_argument("--after", type=Path, required=True, help="a checkout (the change)")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "../shared/data"))
    args = parser.parse_args()
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        small = small_mnist(args.data_dir, Path(tmp) / "small")
        for i, (name, (launcher, flags)) in enumerate(cases(args.data_dir, small).items()):
            results = [outcome(tree.resolve(), launcher, flags, Path(tmp) / f"{i}-{side}")
                       for side, tree in (("before", args.before), ("after", args.after))]
            same = results[0] == results[1] and "error" not in results[0]
            differ += not same
            keys = [k for k in results[0] if results[0].get(k) != results[1].get(k)]
            print(f"{name}: {'identical' if same else 'DIFFERENT ' + ', '.join(keys or ['error'])}", flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
