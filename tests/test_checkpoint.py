"""Checkpoints, exact resume and fault tolerance — real torchrun, real gloo, real signals and kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, child_env, copy_of, free_port, ok, read_json, read_jsonl, torchrun)
from mnist_dist import checkpoint

# On the small MNIST (6,000 images): 15 steps per epoch, 2 epochs: a resume from step 20 is mid-epoch
# 2, after an epoch boundary.
FLAGS = ["--batch-size", "400", "--epochs", "2", "--checkpoint-every", "5", *QUIET]
# rank 0 sleeps 0.15 s after every step of the first attempt: a run that a test signals once its first
# checkpoint exists is still training when the signal comes (the run itself is unchanged)
SLOW_STEPS = "delay,point=step,rank=0,seconds=0.15"


def train_flags(small_mnist: Path, out: Path, *extra: str) -> list[str]:
    return [str(TRAIN_SCRIPT), *FLAGS, "--data-dir", str(small_mnist), "--out-dir", str(out), *extra]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True, map_location="cpu")


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"parameters differ: {different}"


@pytest.fixture
def straight_run(small_mnist, reference_runs) -> Path:
    """The uninterrupted 2-rank reference run (shared: copy it before changing it)."""
    return reference_runs.get(*FLAGS, "--data-dir", str(small_mnist), nproc=2)


@pytest.mark.slow
def test_checkpoints_are_complete_and_pruned(straight_run):
    names = [p.name for p in checkpoint.list_checkpoints(straight_run)]
    assert names == ["step-00000020.pt", "step-00000025.pt", "step-00000030.pt"], "--keep 3 (default)"
    state = checkpoint.load(straight_run / "checkpoints" / "step-00000030.pt", map_location="cpu")
    assert state["global_step"] == 30 and state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert len(state["rng"]) == 2, "every rank's RNG states are saved"
    assert set(state["rng"][1]) >= {"cpu", "python", "numpy"}
    assert all(isinstance(v, torch.Tensor) for v in state["rng"][1].values())
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 30
    assert "scaler" in state and state["config"]["batch_size"] == 400
    assert not list((straight_run / "checkpoints").glob(".*tmp*")), "no temporary files left"


@pytest.mark.slow
def test_resume_after_a_crash_is_bitwise_exact(straight_run, small_mnist, tmp_path, cli):
    out = tmp_path / "run"
    env = child_env(MNIST_DIST_FAULT="raise,rank=0,step=22")
    failed = torchrun(2, *train_flags(small_mnist, out), env=env)
    assert failed.returncode != 0
    assert checkpoint.list_checkpoints(out)[-1].name == "step-00000020.pt"
    # an epoch-end checkpoint may be resumed at another world size (here 1 instead of 2)
    epoch_end = out / "checkpoints" / "step-00000015.pt"
    other = ok(cli(*train_flags(small_mnist, tmp_path / "ws1", "--resume", str(epoch_end))[1:]))  # in-process
    assert "at epoch 2 step 0" in other.stdout
    summary = read_json(tmp_path / "ws1" / "summary.json")
    assert summary["world_size"] == 1 and summary["global_step"] == 30 and summary["test_total"] == 1000
    resumed = ok(torchrun(2, *train_flags(small_mnist, out, "--resume", "auto")))
    assert "resumed from" in resumed.stdout and "step-00000020.pt at epoch 2 step 5" in resumed.stdout
    assert_bitwise_equal(straight_run, out)
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2], "no duplicated epoch"
    assert read_jsonl(out / "metrics.jsonl") [-1]["train_loss"] == read_jsonl(straight_run / "metrics.jsonl")[-1]["train_loss"]


@pytest.mark.slow
def test_elastic_restart_after_sigkill_resumes_by_itself(straight_run, small_mnist, tmp_path):
    """Rank 1 SIGKILLs itself mid-epoch on the first attempt only; torchrun restarts the group."""
    out = tmp_path / "run"
    env = child_env(MNIST_DIST_FAULT="kill,rank=1,step=17,attempt=0")
    proc = ok(torchrun(2, *train_flags(small_mnist, out, "--resume", "auto"), env=env,
                       extra=["--max-restarts=1"]))
    assert "resumed from" in proc.stdout and "step-00000015.pt" in proc.stdout
    assert_bitwise_equal(straight_run, out)


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(straight_run, small_mnist, tmp_path):
    out = tmp_path / "run"
    env = child_env(MNIST_DIST_FAULT="kill,point=checkpoint-rename,rank=0,step=20")
    assert torchrun(2, *train_flags(small_mnist, out), env=env).returncode != 0
    folder = out / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(out)][-1] == "step-00000015.pt"
    assert list(folder.glob(".step-00000020.pt.tmp-*")), "the writer died before its rename"
    checkpoint.load(folder / "step-00000015.pt")  # intact
    resumed = ok(torchrun(2, *train_flags(small_mnist, out, "--resume", "auto")))
    assert "step-00000015.pt" in resumed.stdout
    assert not list(folder.glob(".*tmp*")), "stale temporary files are cleaned up"
    assert_bitwise_equal(straight_run, out)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(straight_run, small_mnist, tmp_path):
    out = copy_of(straight_run, tmp_path)
    newest = out / "checkpoints" / "step-00000030.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    # the crash also cut the logs' last writes short: torn lines, no newline
    for name in ("metrics.jsonl", "evaluations.jsonl"):
        with open(out / name, "a") as fh:
            fh.write('{"epoch": 3, "global_st')
    # the world size must match mid-epoch, so resume with 2 ranks; step 25 is mid-epoch 2
    proc = ok(torchrun(2, *train_flags(small_mnist, out, "--resume", "auto")))
    assert "warning: skipping unusable checkpoint" in proc.stderr and "step-00000030.pt" in proc.stderr
    assert "resumed from" in proc.stdout and "step-00000025.pt" in proc.stdout
    assert proc.stderr.count("dropping an unreadable line") == 2
    assert_bitwise_equal(straight_run, out)
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    evaluations = [[(e["global_step"], e["test_correct"]) for e in read_jsonl(run / "evaluations.jsonl")]
                   for run in (out, straight_run)]
    assert evaluations[0] == evaluations[1]


@pytest.mark.parametrize("damage, needle", [
    ("truncated", "is corrupt or truncated"),
    ("foreign", "is not an mnist-dist checkpoint"),
    ("missing", "does not exist"),
    ("directory", "is a directory but no checkpoint"),
])
def test_explicit_bad_checkpoint_is_one_clear_error(straight_run, small_mnist, tmp_path, damage, needle, cli):
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes((straight_run / "checkpoints" / "step-00000030.pt").read_bytes()[:5000])
    elif damage == "foreign":
        torch.save({"model": {}}, bad)
    elif damage == "directory":
        bad.mkdir()
    proc = cli(*train_flags(small_mnist, tmp_path / "run", "--resume", str(bad))[1:])
    assert proc.returncode == 2
    assert_one_line_error(proc, needle, str(bad))


def test_mid_epoch_checkpoint_resumes_at_another_world_size_but_not_with_other_flags(
        straight_run, small_mnist, tmp_path, cli):
    """The data position is world-size free, so a 2-rank mid-epoch checkpoint resumes in
    one process (it used to be refused); the flags that shape the math still must not change."""
    mid = straight_run / "checkpoints" / "step-00000025.pt"
    resumed = ok(cli(*train_flags(small_mnist, tmp_path / "run", "--resume", str(mid))[1:]))
    assert "at epoch 2 step 10 (global step 25)" in resumed.stdout
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["global_step"] == 30 and summary["world_sizes"] == [2, 1]
    changed = cli(*train_flags(small_mnist, tmp_path / "run2", "--resume", str(mid), "--lr", "0.5",
                               "--betas", "0.9", "0.99", "--grad-clip", "1")[1:])
    assert_one_line_error(changed, "--lr 0.01 (now 0.5)", "--betas [0.7, 0.9] (now [0.9, 0.99])",
                          "--grad-clip 0.0 (now 1.0)")


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """RANK -> pid of the worker processes that torchrun (``agent_pid``) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(straight_run, small_mnist, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           *train_flags(small_mnist, out), "--stop-check-every", "1"]
    agent = subprocess.Popen(cmd, env=child_env(MNIST_DIST_FAULT=SLOW_STEPS), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.list_checkpoints(out):  # training is under way once the first one exists
            assert agent.poll() is None, agent.communicate()
            assert time.monotonic() < deadline, "training never produced a checkpoint"
            time.sleep(0.2)
        workers = _worker_pids(agent.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)  # one rank only
        sent = time.monotonic()
        stdout, stderr = agent.communicate(timeout=60)
        assert time.monotonic() - sent < 30, "all ranks must stop within 30 s"
    finally:
        agent.kill()
    assert "stopped by signal SIGTERM" in stdout, stderr
    assert "exitcode  : 3" in stderr or "exitcode: 3" in stderr.replace(" ", ""), stderr
    newest = checkpoint.list_checkpoints(out)[-1]
    state = checkpoint.load(newest)
    assert f"(global step {state['global_step']}); checkpoint {newest}" in stdout
    assert len(state["rng"]) == 2, "both ranks took part in the stop checkpoint"
    assert not (out / "summary.json").exists()
    resumed = ok(torchrun(2, *train_flags(small_mnist, out, "--resume", "auto")))
    assert f"resumed from {newest}" in resumed.stdout
    assert_bitwise_equal(straight_run, out)


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def test_sigterm_to_the_whole_job_with_dataloader_workers_still_checkpoints(small_mnist, tmp_path):
    # A scheduler (SLURM preemption, docker stop of a process group) signals every process of the job:
    # the agent, the ranks and their DataLoader workers. The workers must ignore it (worker_init_fn),
    # or the ranks' next batch raises "DataLoader worker ... exited unexpectedly" instead of a checkpoint.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           *train_flags(small_mnist, out, "--loader", "dataloader", "--num-workers", "2", "--batch-size", "512",
                        "--stop-check-every", "1")]
    stop_file = tmp_path / "stopped"  # how slurm/train.sbatch learns that the ranks stopped with a checkpoint
    agent = subprocess.Popen(cmd, env=child_env(MNIST_DIST_STOP_FILE=str(stop_file), MNIST_DIST_FAULT=SLOW_STEPS),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.list_checkpoints(out):  # mid-epoch 1: the workers are running
            assert agent.poll() is None, agent.communicate()
            assert time.monotonic() < deadline, "training never produced a checkpoint"
            time.sleep(0.1)
        ranks = _worker_pids(agent.pid)
        loader_workers = [c for pid in ranks.values() for c in _children(pid)]
        assert len(loader_workers) >= 4, f"expected 2 DataLoader workers per rank, found {loader_workers}"
        os.killpg(agent.pid, signal.SIGTERM)  # everyone, as slurmstepd does on preemption
        stdout, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert "exited unexpectedly" not in stderr and "killed by signal" not in stderr, stderr
    assert "stopped by signal SIGTERM" in stdout, stdout + stderr
    newest = checkpoint.list_checkpoints(out)[-1]
    state = checkpoint.load(newest)
    assert f"(global step {state['global_step']}); checkpoint {newest}" in stdout
    assert len(state["rng"]) == 2, "both ranks took part in the stop checkpoint"
    assert stop_file.read_text().strip() == str(newest)


@pytest.mark.slow
def test_a_rank_raising_ends_the_job_promptly(small_mnist, tmp_path):
    started = time.monotonic()
    env = child_env(MNIST_DIST_FAULT="raise,rank=1,step=3")
    proc = torchrun(2, *train_flags(small_mnist, tmp_path / "run"), env=env, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    assert "injected fault" in proc.stderr
    assert "rank      : 1" in proc.stderr or "rank: 1" in proc.stderr.replace("  ", ""), proc.stderr


@pytest.mark.slow
def test_plain_process_sigint_checkpoints_and_exits_3(small_mnist, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *train_flags(small_mnist, out), "--stop-check-every", "1"],
                            env=child_env(MNIST_DIST_FAULT=SLOW_STEPS), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.list_checkpoints(out):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    assert "stopped by signal SIGINT" in stdout
    assert "Traceback" not in stderr


def test_resume_auto_needs_an_out_dir(small_mnist, cli):
    proc = cli("--resume", "auto", "--data-dir", small_mnist)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--resume auto needs --out-dir")
