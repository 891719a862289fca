"""Elastic training: mid-epoch resume at any world size, gradient accumulation, scale-down
without stopping, resume without a shared filesystem, checkpoint format versions. Real torchrun
agents, real gloo, real kills."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import (QUIET, REPO, TRAIN_SCRIPT, assert_one_line_error, child_env, free_port, last_json_line,
                      ok, read_json, read_jsonl, torchrun)
from mnist_dist import checkpoint


def flags(data_root, out, *extra: str) -> list[str]:
    return [str(TRAIN_SCRIPT), "--data-dir", str(data_root), "--out-dir", str(out), *QUIET, *extra]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------- gradient accumulation
SGD_FLAGS = ["--batch-size", "64", "--max-steps", "20", "--optimizer", "sgd", "--lr", "0.05", "--schedule",
             "constant"]


@pytest.mark.slow
def test_grad_accum_equals_more_ranks(small_mnist, tmp_path, cli):
    """1 rank x K=2 (in this process) and 2 ranks x K=1 (same global batch, same sample order): equal
    weights after 20 steps up to float summation order. SGD (linear in the gradient) keeps that at ~1e-7."""
    common = SGD_FLAGS
    ok(cli(*flags(small_mnist, tmp_path / "accum", *common, "--grad-accum", "2")[1:]))
    ok(torchrun(2, *flags(small_mnist, tmp_path / "ranks", *common)))
    a, b = weights(tmp_path / "accum"), weights(tmp_path / "ranks")
    torch.manual_seed(0)
    from mnist_dist.models import build_model

    init = build_model("fast").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"max parameter difference {worst}"
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3, "training barely moved"
    config = read_json(tmp_path / "accum" / "config.json")
    assert (config["grad_accum_steps"], config["micro_batch"]) == (2, 32)


COUNT_ALL_REDUCES = textwrap.dedent("""
    # Under torchrun: count DDP's gradient all_reduces (a comm hook) over a few optimizer steps.
    import json, sys
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from mnist_dist.callbacks import Callbacks
    from mnist_dist.checkpoint import Checkpoints
    from mnist_dist.entry import parse_train_args, setup_engine
    from mnist_dist.outputs.rundir import RunDir
    from mnist_dist.train import train_epoch
    from mnist_dist.trainer import Trainer

    cfg = parse_train_args(sys.argv[1:])
    engine = setup_engine(cfg)
    try:
        trainer = Trainer.build(cfg, engine)
        count = [0]
        def counting_hook(state, bucket):
            count[0] += 1
            return allreduce_hook(state, bucket)
        trainer.wrapped.register_comm_hook(None, counting_hook)
        train_epoch(trainer, RunDir(cfg.out_dir, enabled=False), Checkpoints(cfg, engine.env), Callbacks())
        if engine.env.is_main:
            print(json.dumps({"all_reduces": count[0], "steps": trainer.position.global_step,
                              "grad_accum": trainer.grad_accum, "engine": engine.name}))
        engine.env.barrier()
    finally:
        engine.teardown()
""")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "accelerate"])
def test_one_gradient_all_reduce_per_optimizer_step(small_mnist, tmp_path, engine):
    if engine == "accelerate":
        pytest.importorskip("accelerate")
    script = tmp_path / "count.py"
    script.write_text(COUNT_ALL_REDUCES)
    proc = ok(torchrun(2, str(script), "--engine", engine, "--data-dir", str(small_mnist), "--out-dir",
                       str(tmp_path / "run"), "--grad-accum", "4", "--max-steps", "6", *QUIET))
    result = last_json_line(proc.stdout)
    # the model's gradients fit one DDP bucket: exactly one all_reduce per optimizer step, not 4
    assert result == {"all_reduces": 6, "steps": 6, "grad_accum": 4, "engine": engine}


@pytest.mark.slow
def test_accelerate_engine_accumulates_like_ddp(small_mnist, tmp_path, cli):
    """2 ranks x K=2 under the accelerate engine and 1 rank x K=4 under ddp (in this process): the
    same micro-batches of 16 in the same order, so the same weights up to float summation order."""
    pytest.importorskip("accelerate")
    ok(torchrun(2, *flags(small_mnist, tmp_path / "acc", *SGD_FLAGS, "--grad-accum", "2", "--engine",
                          "accelerate")))
    ok(cli(*flags(small_mnist, tmp_path / "ddp", *SGD_FLAGS, "--grad-accum", "4")[1:]))
    a, b = weights(tmp_path / "acc"), weights(tmp_path / "ddp")
    assert read_json(tmp_path / "acc" / "config.json")["micro_batch"] == 16
    assert read_json(tmp_path / "ddp" / "config.json")["micro_batch"] == 16
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_grad_accum_auto_keeps_the_micro_batch_under_the_limit(small_mnist, tmp_path):
    ok(torchrun(2, *flags(small_mnist, tmp_path / "run", "--grad-accum", "auto", "--max-micro-batch", "50",
                          "--max-steps", "3")))
    config = read_json(tmp_path / "run" / "config.json")
    # per-rank batch 128: K = 3 does not divide it, K = 4 gives 32 <= 50
    assert (config["grad_accum_steps"], config["micro_batch"]) == (4, 32)
    assert read_json(tmp_path / "run" / "summary.json")["grad_accum_steps"] == 4


@pytest.mark.parametrize("args, needle", [
    (["--grad-accum", "0"], "--grad-accum must be a positive integer or auto"),
    (["--grad-accum", "two"], "--grad-accum must be a positive integer or auto"),
    (["--grad-accum", "auto"], "--grad-accum auto needs --max-micro-batch"),
    (["--grad-accum", "3"], "must be divisible by world size 1 x --grad-accum 3 = 3"),
    (["--max-micro-batch", "-1"], "--max-micro-batch must be >= 0"),
])
def test_bad_grad_accum_flags(small_mnist, tmp_path, args, needle, cli):
    result = cli(*flags(small_mnist, tmp_path / "r", "--max-steps", "1", *args)[1:])
    assert result.returncode == 2
    assert_one_line_error(result, needle)


# ----------------------------------------------------------------------------- any world size, mid-epoch
def epoch_indices(log_prefix: Path, world: int, epoch: int, steps: range) -> list[int]:
    found = []
    for rank in range(world):
        for line in Path(f"{log_prefix}.rank{rank}").read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] == epoch and record["step"] in steps:
                found += record["indices"]
    return found


@pytest.mark.slow
def test_three_ranks_crash_mid_epoch_and_resume_on_two(small_mnist, tmp_path):
    """Batch 192 on the small MNIST (6,000 images): 31 global batches per epoch at 3 ranks (64 each)
    and at 2 (96 each). A crash at step 15 after the checkpoint of step 10, resumed on 2 ranks: over
    the epoch every training index is used exactly once (but the 48 that drop_last leaves out, the
    same at any world size), and the final accuracy is within 1 point (10 of the 1,000 test images) of
    the uninterrupted 3-rank run."""
    common = ["--batch-size", "192", "--checkpoint-every", "10"]
    ok(torchrun(3, *flags(small_mnist, tmp_path / "straight", *common)))
    out = tmp_path / "run"
    first, second = tmp_path / "first", tmp_path / "second"
    crashed = torchrun(3, *flags(small_mnist, out, *common),
                       env=child_env(MNIST_DIST_FAULT="raise,rank=0,step=15", MNIST_DIST_INDEX_LOG=str(first)))
    assert crashed.returncode != 0
    assert checkpoint.list_checkpoints(out)[-1].name == "step-00000010.pt"
    resumed = ok(torchrun(2, *flags(small_mnist, out, *common, "--resume", "auto"),
                          env=child_env(MNIST_DIST_INDEX_LOG=str(second))))
    assert "at epoch 1 step 10 (global step 10)" in resumed.stdout
    used = epoch_indices(first, 3, 0, range(0, 10)) + epoch_indices(second, 2, 0, range(10, 31))
    assert len(used) == len(set(used)) == 31 * 192, "an index was used twice or not at all"
    assert len(set(range(6000)) - set(used)) == 6000 - 31 * 192 == 48
    straight, summary = read_json(tmp_path / "straight" / "summary.json"), read_json(out / "summary.json")
    assert summary["world_sizes"] == [3, 2] and summary["test_total"] == 1000
    assert abs(summary["test_accuracy"] - straight["test_accuracy"]) <= 0.01, (summary, straight)
    assert read_jsonl(out / "metrics.jsonl")[-1]["world_size"] == 2


# ----------------------------------------------------------------------------- scale down, no shared storage
def agent(data_root, out, port: int, *extra: str, nnodes: str = "1:2", cwd: Path = REPO,
          env: dict | None = None, max_restarts: int = 3) -> subprocess.Popen:
    """One torchrun agent (a "node") with one worker, in its own session so it can be killed whole."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
           f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test",
           "--rdzv-conf=join_timeout=120,last_call_timeout=5,close_timeout=10",
           *flags(data_root, out, *extra)]
    return subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def kill_node(agent_proc: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers (torchrun starts each worker in a session of its own)."""
    workers = children(agent_proc.pid)
    os.killpg(agent_proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_node(proc)
        out, err = proc.communicate()
        pytest.fail(f"agent did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


@pytest.mark.slow
def test_scale_down_without_stopping_the_job(small_mnist, tmp_path):
    """Two agents (torchrun --nnodes=1:2 --max-restarts=3); SIGKILL one agent and its worker
    mid-epoch: the survivor re-forms the group at world size 1, resumes mid-epoch from the newest
    checkpoint and finishes. (3 epochs of the small MNIST, 23 steps each; rank 0 sleeps 0.1 s after
    each step of the first attempt, so the kill comes while the job trains.)"""
    out, port = tmp_path / "run", free_port()
    extra = ["--epochs", "3", "--checkpoint-every", "10", "--resume", "auto"]
    env = child_env(MNIST_DIST_FAULT="delay,point=step,rank=0,seconds=0.1")
    survivor = agent(small_mnist, out, port, *extra, env=env)
    time.sleep(3)  # the survivor hosts the rendezvous store (the first agent to bind the port does)
    victim = agent(small_mnist, out, port, *extra, env=env)
    try:
        deadline = time.monotonic() + 300
        while not any(c.name >= "step-00000030.pt" for c in checkpoint.list_checkpoints(out)):
            assert survivor.poll() is None and victim.poll() is None, survivor.communicate()
            assert time.monotonic() < deadline, "training never reached step 30"
            time.sleep(0.2)
        kill_node(victim)  # a node is gone: its agent and its worker
        code, stdout, stderr = finish(survivor, 1200)
    finally:
        for proc in (survivor, victim):
            if proc.poll() is None:
                kill_node(proc)
    assert code == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "resumed from" in stdout and "world size 1" in stdout, stdout
    summary = read_json(out / "summary.json")
    assert summary["world_sizes"] == [2, 1], summary["world_sizes"]
    assert summary["test_accuracy"] >= 0.9 and summary["epochs"] == 3 and summary["global_step"] == 69
    assert [m["world_size"] for m in read_jsonl(out / "metrics.jsonl")][-1] == 1
    # the restart is on record: the checkpoint it resumed from, how far the first attempt got, the steps lost
    (restart,) = summary["restarts"]
    assert restart["attempt"] == 1 and restart["world_size"] == 1, restart
    assert restart["resumed_at_step"] >= 30 and restart["resumed_from"].endswith(f"step-{restart['resumed_at_step']:08d}.pt")
    assert restart["reached_step"] >= restart["resumed_at_step"], restart  # the first attempt's last heartbeats
    assert restart["lost_steps"] == restart["reached_step"] - restart["resumed_at_step"], restart
    assert f"restart 1 of this job at world size 1: resumed at global step {restart['resumed_at_step']}" in stdout


@pytest.mark.slow
def test_resume_without_a_shared_filesystem(small_mnist, tmp_path):
    """Two agents in different working directories, a relative --out-dir: two separate trees, as on
    two nodes without shared storage. Each tree gets a copy of every checkpoint (elastic.py); with
    rank 0's copies gone, the resume reads the newest copy where it is (rank 1's tree) and broadcasts it."""
    trees = [tmp_path / "node-a", tmp_path / "node-b"]
    for tree in trees:
        tree.mkdir()
    common = ["--epochs", "3", "--max-steps", "60", "--checkpoint-every", "20"]

    def launch(*extra: str, env: dict | None = None) -> list[tuple[int, str, str]]:
        port = free_port()
        procs = []
        for i, tree in enumerate(trees):  # the first agent has the lower pid: its worker is rank 0 (c10d)
            procs.append(agent(small_mnist, Path("run"), port, *common, *extra, nnodes="2", cwd=tree, env=env,
                               max_restarts=0))
            if i == 0:
                time.sleep(2)
        return [finish(p, 600) for p in procs]

    crashed = launch(env=child_env(MNIST_DIST_FAULT="raise,rank=0,step=45"))  # epoch ends: steps 23, 46
    assert all(code != 0 for code, _, _ in crashed)
    assert "do not see rank 0's run/checkpoints: each keeps a copy of every checkpoint there" in crashed[0][1], crashed
    rank0, other = trees
    assert (rank0 / "run" / "config.json").is_file() and not (other / "run" / "config.json").exists()
    copies = [[c.name for c in checkpoint.list_checkpoints(t / "run")] for t in trees]
    assert copies[0] == copies[1] and copies[0][-1] == "step-00000040.pt", copies  # the same files on both
    digests = [checkpoint.load(t / "run" / "checkpoints" / "step-00000040.pt")["sha256"] for t in trees]
    assert digests[0] == digests[1]
    shutil.rmtree(rank0 / "run" / "checkpoints")  # rank 0's host lost its disk: the newest copy is elsewhere
    results = launch("--resume", "auto")
    assert all(code == 0 for code, _, _ in results), results
    assert "resumed from run/checkpoints/step-00000040.pt" in results[0][1], results
    assert read_json(rank0 / "run" / "summary.json")["global_step"] == 60
    assert [c.name for c in checkpoint.list_checkpoints(rank0 / "run")][-1] == "step-00000060.pt"
    assert [c.name for c in checkpoint.list_checkpoints(other / "run")][-1] == "step-00000060.pt"


# ----------------------------------------------------------------------------- format versions
def test_version_1_checkpoints_resume_and_newer_ones_are_refused(small_mnist, tmp_path, cli):
    out = tmp_path / "run"
    common = ["--max-steps", "20", "--checkpoint-every", "10"]
    ok(cli(*flags(small_mnist, out, *common)[1:]))
    straight = weights(out)
    path = out / "checkpoints" / "step-00000010.pt"
    state = torch.load(path, weights_only=True)
    assert state["version"] == 3 and state["epoch_samples"] == 10 * 256 and state["world_sizes"] == [1]
    assert len(state["sha256"]) == 64
    # the formats before: version 2 had no checksum; version 1 also lacked what version 2 added
    v2 = {k: v for k, v in state.items() if k != "sha256"}
    v1 = {k: v for k, v in v2.items() if k not in ("epoch_samples", "world_sizes", "grad_accum", "precision")}
    for version, old in ((1, v1), (2, v2)):
        torch.save({**old, "version": version}, tmp_path / f"v{version}.pt")
        ok(cli(*flags(small_mnist, tmp_path / f"from-v{version}", *common, "--resume", str(tmp_path / f"v{version}.pt"))[1:]))
        resumed = weights(tmp_path / f"from-v{version}")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), f"a v{version} checkpoint resumes exactly"
    newer = tmp_path / "v4.pt"
    torch.save({**state, "version": 4}, newer)
    proc = cli(*flags(small_mnist, tmp_path / "from-v4", *common, "--resume", str(newer))[1:])
    assert proc.returncode == 2
    assert_one_line_error(proc, "has format version 4, newer than this mnist-dist reads (1..3)")
