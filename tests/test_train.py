"""End-to-end runs: real processes, real gloo, the real MNIST, every launch mode."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, child_env, free_port, last_json_line, ok, python,
                      read_json, read_jsonl, torchrun)

METRIC_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_correct",
               "test_total", "images_per_second", "epoch_seconds"}
SUMMARY_KEYS = {"test_accuracy", "test_correct", "test_total", "world_size", "train_seconds",
                "per_class_accuracy"}


def check_run_dir(out: Path, world_size: int, epochs: int = 1, test_total: int = 10000) -> dict:
    """A finished run directory: its files, counts that add up, weights without wrapper prefixes.
    ``test_total`` 1,000 for the small MNIST (its per-class counts are not checked)."""
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt"):
        assert (out / name).is_file(), f"{name} missing in {out}"
    config = read_json(out / "config.json")
    assert config["world_size"] == world_size
    assert config["torch_version"] == torch.__version__ and config["hostnames"]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == epochs and all(METRIC_KEYS <= set(m) for m in metrics)
    summary = read_json(out / "summary.json")
    assert SUMMARY_KEYS <= set(summary)
    assert summary["world_size"] == world_size
    assert summary["test_total"] == test_total
    assert summary["test_correct"] == metrics[-1]["test_correct"]
    assert abs(summary["test_accuracy"] - summary["test_correct"] / test_total) < 1e-12
    assert sum(summary["per_class_correct"]) == summary["test_correct"]
    assert sum(summary["per_class_total"]) == test_total
    if test_total == 10000:
        assert summary["per_class_total"] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    state = torch.load(out / "model.pt", weights_only=True, map_location="cpu")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    return summary


def test_single_process_run_learns(trained_run):
    summary = check_run_dir(trained_run, world_size=1)
    assert summary["test_accuracy"] >= 0.95 and summary["launcher"] == "python"
    config = read_json(trained_run / "config.json")
    assert config["backend"] is None and config["config"]["model"] == "fast"


@pytest.mark.slow
def test_torchrun_two_ranks(small_mnist, reference_runs):
    """The session's shared 2-rank run of the default recipe on the small MNIST (2 epochs)."""
    out = reference_runs.get("--seed", "3", "--epochs", "2", "--data-dir", str(small_mnist), *QUIET, nproc=2)
    proc = (out.parent / "stdout.txt").read_text()
    summary = check_run_dir(out, world_size=2, epochs=2, test_total=1000)
    assert summary["test_accuracy"] >= 0.9 and summary["launcher"] == "torchrun"
    assert read_json(out / "config.json")["backend"] == "gloo"
    assert read_json(out / "config.json")["per_rank_batch"] == 128
    assert proc.count("epoch 1/2") == 1, "only rank 0 logs"


@pytest.mark.slow
def test_two_node_rendezvous_on_localhost(small_mnist, tmp_path):
    """Two torchrun agents (two 'nodes') meet through a c10d rendezvous on a free port."""
    port = free_port()
    out = tmp_path / "run"
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=twonode", str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir",
               str(out), "--max-steps", "20", *QUIET]
        procs.append(subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
    check_run_dir(out, world_size=2, test_total=1000)


@pytest.mark.slow
def test_module_and_console_script_entry_points(small_mnist, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(python("-m", "mnist_dist", "train", "--data-dir", str(small_mnist), "--out-dir", str(a),
              "--max-steps", "5", *QUIET))
    script = shutil.which("mnist-dist") or str(Path(sys.executable).parent / "mnist-dist")
    ok(subprocess.run([script, "--data-dir", str(small_mnist), "--out-dir", str(b), "--max-steps", "5", *QUIET],
                      capture_output=True, text=True, timeout=300, env=child_env()))
    for out in (a, b):
        assert read_json(out / "summary.json")["test_total"] == 1000
    # the console script's error path: one line and exit code 2, as train_ddp.py's
    refused = subprocess.run([script, "--epochs", "0", "--out-dir", str(tmp_path / "c")], capture_output=True,
                             text=True, timeout=120, env=child_env())
    assert refused.returncode == 2
    assert_one_line_error(refused, "--epochs must be a positive integer")


@pytest.mark.slow
def test_evaluate_is_exact_at_world_sizes_1_2_3(trained_run, mnist_root, cli):
    expected = read_json(trained_run / "summary.json")["test_correct"]
    args = ["-m", "mnist_dist", "evaluate", "--run-dir", str(trained_run), "--data-dir", str(mnist_root)]
    results = [last_json_line(ok(cli(*args[2:])).stdout)]  # world size 1 in this process
    for world in (2, 3):
        results.append(last_json_line(ok(torchrun(world, *args)).stdout))
    assert [r["world_size"] for r in results] == [1, 2, 3]
    assert {r["test_total"] for r in results} == {10000}
    assert {r["test_correct"] for r in results} == {expected}


@pytest.mark.slow
def test_ddp_matches_single_process_with_the_same_global_batch(mnist_root, tmp_path, cli):
    """Seed model: 2 ranks x 32 vs 1 rank x 64, same seed and sampler order, 20 steps.

    With SGD the update is linear in the gradient, so the two runs differ only by float summation
    order (~1e-7). Adam divides by sqrt(v): for parameters whose gradient is ~0 (dead units) that
    amplifies the same rounding noise up to ~lr per step, so its tolerance is looser.
    """
    from mnist_dist.models import build_model

    common = ["--recipe", "seed", "--batch-size", "64", "--max-steps", "20", "--data-dir",
              str(mnist_root), *QUIET]
    torch.manual_seed(0)  # the runs seed themselves with --seed 0: this is their initialisation
    init = build_model("seed").state_dict()
    for optimizer, lr, tolerance in (("sgd", "0.05", 1e-5), ("adam", "1e-4", 1e-4)):
        one, two = tmp_path / f"{optimizer}-one", tmp_path / f"{optimizer}-two"
        flags = [*common, "--optimizer", optimizer, "--lr", lr]
        ok(cli(*flags, "--out-dir", one))  # one rank, in this process
        ok(torchrun(2, str(TRAIN_SCRIPT), *flags, "--out-dir", str(two)))
        a = torch.load(one / "model.pt", weights_only=True)
        b = torch.load(two / "model.pt", weights_only=True)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < tolerance, f"{optimizer}: max parameter difference {worst}"
        moved = max((a[k] - init[k]).abs().max().item() for k in a)
        assert moved > 10 * tolerance, f"{optimizer}: training barely moved the parameters"


@pytest.mark.slow
def test_classic_dataloader_and_bf16_paths(small_mnist, tmp_path):
    out = tmp_path / "loader"
    ok(torchrun(2, str(TRAIN_SCRIPT), "--loader", "dataloader", "--num-workers", "1", "--amp", "bf16",
                "--max-steps", "20", "--data-dir", str(small_mnist), "--out-dir", str(out), *QUIET))
    config = read_json(out / "config.json")
    assert config["amp"] == "bf16" and config["config"]["loader"] == "dataloader"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert metrics[0]["train_loss"] == metrics[0]["train_loss"]  # finite, not NaN
    assert read_json(out / "summary.json")["test_accuracy"] > 0.8
