"""The CUDA paths, on a real GPU (`pytest -m gpu`; skipped, saying why, where there is none).

One GPU is enough: the multi-rank CUDA paths (DDP on CUDA tensors, device-placed collectives, the
stop flag, exact evaluation) run with two ranks sharing it over gloo (NCCL refuses two ranks on one
GPU). `benchmarks/gpu.py` runs this file first, then measures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import (REPO, TRAIN_SCRIPT, free_port, gpu_env, last_json_line, ok, read_json, run)
from test_outputs_extra import EXPORT_CHECK, read_json_line

pytestmark = pytest.mark.gpu

QUIET = ("--no-progress", "--no-plots")


def gpu_python(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, *args], timeout=timeout, env=gpu_env(**env))


def train(mnist_root, out, *args: str, env: dict | None = None, timeout: float = 300):
    return gpu_python(str(TRAIN_SCRIPT), "--data-dir", str(mnist_root), "--out-dir", str(out), *QUIET, *args,
                      timeout=timeout, **(env or {}))


def weights(out) -> dict:
    return torch.load(out / "model.pt", weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_to_99(mnist_root, tmp_path, amp):
    out = tmp_path / amp
    ok(train(mnist_root, out, "--amp", amp, "--no-export"))
    summary = read_json(out / "summary.json")
    assert summary["amp"] == amp and summary["test_accuracy"] >= 0.99, summary
    assert summary["grad_scaler_enabled"] is (amp == "fp16")
    assert read_json(out / "config.json")["device"] == "cuda:0"


def test_auto_precision_is_native_bf16_else_fp16():
    from mnist_dist.engines._base import resolve_precision

    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve_precision("auto", torch.device("cuda", 0)).name == ("bf16" if native else "fp16")


def test_fp16_resumes_a_bf16_checkpoint(mnist_root, tmp_path):
    out = tmp_path / "run"
    common = ["--max-steps", "120", "--checkpoint-every", "50", "--no-export"]
    crashed = train(mnist_root, out, *common, "--amp", "bf16", env={"MNIST_DIST_FAULT": "raise,rank=0,step=70"})
    assert crashed.returncode != 0
    resumed = ok(train(mnist_root, out, *common, "--amp", "fp16", "--resume", "auto"))
    assert "amp bf16 -> fp16 (GradScaler starts at its initial scale)" in resumed.stdout, resumed.stdout
    summary = read_json(out / "summary.json")
    assert summary["global_step"] == 120 and summary["amp"] == "fp16" and summary["test_accuracy"] > 0.95


# ----------------------------------------------------------------------------- no host sync in the step
SYNC_PROBE = textwrap.dedent("""
    # 20 training batches through the real loop body (train.train_batch) under
    # torch.cuda.set_sync_debug_mode("error"), after the warm-up, optionally after a resume; prints one
    # JSON line.
    import json, sys, torch
    from mnist_dist.callbacks import Callbacks
    from mnist_dist.checkpoint import Checkpoints
    from mnist_dist.entry import parse_train_args, setup_engine
    from mnist_dist.outputs.rundir import RunDir
    from mnist_dist.train import train_batch
    from mnist_dist.trainer import Trainer

    cfg = parse_train_args(sys.argv[1:])
    engine = setup_engine(cfg)
    trainer = Trainer.build(cfg, engine)
    checkpoints = Checkpoints(cfg, engine.env)
    resumed = checkpoints.resume(trainer)
    # Adam's step counts: on the CPU (plain Adam reads them with .item() each step), or on the
    # parameter's GPU for the fused / capturable kernels that read them there
    groups = {id(q): g for g in trainer.optimizer.param_groups for q in g["params"]}
    steps_placed = all(
        s["step"].device == (q.device if groups[id(q)].get("fused") or groups[id(q)].get("capturable")
                             else torch.device("cpu"))
        for q, s in trainer.optimizer.state.items())
    trainer.warm_up(5)
    trainer.model.train()
    trainer.clock.start_epoch(engine.env.device)
    batches = trainer.epoch_batches()  # the epoch's order goes to the device with the first batch
    first = next(batches)
    if trainer.transform is not None:
        trainer.transform.epoch_params(trainer.position.epoch)  # one draw per epoch, outside the steps
    torch.cuda.synchronize()
    result = {"sync_free": True, "why": "", "resumed": resumed, "optimizer_steps_placed": steps_placed}
    run, observers = RunDir(cfg.out_dir, enabled=False), Callbacks()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, x, y in [first, *(next(batches) for _ in range(19))]:
            train_batch(trainer, step, x, y, run, checkpoints, observers)
    except RuntimeError as exc:
        result.update(sync_free=False, why=" ".join(str(exc).split())[:300])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    print(json.dumps(result))
""")


@pytest.mark.parametrize("recipe", ["fast", "best"])
@pytest.mark.parametrize("after_resume", [False, True], ids=["after-warmup", "after-resume"])
def test_training_step_is_sync_free(mnist_root, tmp_path, recipe, after_resume):
    """Default (bf16) precision, the recipe's own settings, stop checks every 10 steps included."""
    out = tmp_path / "run"
    args = ["--recipe", recipe, "--data-dir", str(mnist_root), "--out-dir", str(out), *QUIET, "--no-export"]
    if after_resume:  # a real checkpoint from a real run, mid-epoch
        ok(train(mnist_root, out, "--recipe", recipe, "--max-steps", "30", "--checkpoint-every", "30",
                 "--no-export"))
        args += ["--resume", "auto"]
    result = last_json_line(ok(gpu_python("-c", SYNC_PROBE, *args)).stdout)
    assert result["sync_free"], result["why"]
    assert result["resumed"] is None or after_resume
    if after_resume:
        assert result["resumed"] and result["optimizer_steps_placed"], result


# ----------------------------------------------------------------------------- compile, export, determinism
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training(mnist_root, tmp_path, mode):
    out = tmp_path / mode
    ok(train(mnist_root, out, "--compile", "--compile-mode", mode, "--warmup-steps", "10", "--no-export",
             timeout=600))
    summary = read_json(out / "summary.json")
    assert summary["compile"] is True and summary["compile_mode"] == mode and summary["test_accuracy"] >= 0.98
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights(out))


def test_export_of_a_cuda_trained_model(mnist_root, tmp_path):
    """model.pt2 from a CUDA run loads and runs on the CPU, in a process without our code. The CPU
    count may differ from the CUDA evaluation by a few images (cuDNN's TF32 convolutions)."""
    out = tmp_path / "run"
    ok(train(mnist_root, out))
    proc = ok(run([sys.executable, "-c", EXPORT_CHECK, str(out), str(mnist_root / "MNIST" / "raw")], timeout=300))
    cpu_correct = read_json_line(proc.stdout)["correct"]
    assert abs(cpu_correct - read_json(out / "summary.json")["test_correct"]) <= 10


def test_deterministic_resume_is_bit_identical(mnist_root, tmp_path):
    common = ["--max-steps", "60", "--checkpoint-every", "25", "--deterministic", "--no-export"]
    ok(train(mnist_root, tmp_path / "straight", *common))
    crashed = tmp_path / "crashed"
    assert train(mnist_root, crashed, *common, env={"MNIST_DIST_FAULT": "raise,rank=0,step=40"}).returncode != 0
    ok(train(mnist_root, crashed, *common, "--resume", "auto"))
    a, b = weights(tmp_path / "straight"), weights(crashed)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# ----------------------------------------------------------------------------- two ranks on one GPU
def torchrun_gpu(nproc: int, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *args]
    return run(cmd, timeout=timeout, env=gpu_env())


def test_two_ranks_share_one_gpu_over_gloo(mnist_root, tmp_path):
    """DDP on CUDA tensors, device-placed collectives (training sums, stop flag, exact evaluation)."""
    out = tmp_path / "run"
    ok(torchrun_gpu(2, str(TRAIN_SCRIPT), "--backend", "gloo", "--device", "cuda", "--data-dir", str(mnist_root),
                    "--out-dir", str(out), *QUIET, "--no-export", "--stop-check-every", "5"))
    summary, config = read_json(out / "summary.json"), read_json(out / "config.json")
    assert summary["world_size"] == 2 and config["backend"] == "gloo" and config["device"].startswith("cuda")
    assert summary["test_total"] == 10000 and summary["test_accuracy"] >= 0.98
    # the same weights evaluate to the same exact count on 3 ranks sharing the GPU and on 1
    for nproc in (3, 1):
        evaluated = ok(torchrun_gpu(nproc, "-m", "mnist_dist", "evaluate", "--run-dir", str(out), "--data-dir",
                                    str(mnist_root), "--backend", "gloo", "--device", "cuda"))
        assert last_json_line(evaluated.stdout)["test_correct"] == summary["test_correct"]


def test_sigterm_to_one_rank_on_the_gpu_stops_both(mnist_root, tmp_path):
    """The lagged (sync-free) stop flag still makes both ranks stop at the same step."""
    from test_checkpoint import _worker_pids
    from mnist_dist import checkpoint

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(TRAIN_SCRIPT),
           "--backend", "gloo", "--device", "cuda", "--data-dir", str(mnist_root), "--out-dir", str(out), *QUIET,
           "--no-export", "--epochs", "3", "--checkpoint-every", "40", "--stop-check-every", "2"]
    agent = subprocess.Popen(cmd, env=gpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.list_checkpoints(out):
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()
            time.sleep(0.2)
        workers = _worker_pids(agent.pid)
        os.kill(workers[1], signal.SIGTERM)
        stdout, stderr = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert "stopped by signal SIGTERM" in stdout, stderr
    state = checkpoint.load(checkpoint.list_checkpoints(out)[-1])
    assert len(state["rng"]) == 2 and not (out / "summary.json").exists()
