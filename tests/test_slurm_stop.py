"""slurm/train.sbatch under stop signals on the real local SLURM cluster (see test_slurm.py): USR1 before
the time limit, TERM as a scheduler preempts (to every process of the job), job arrays whose tasks
refer to themselves as ARRAYID_TASKID, and the cap on requeues."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import read_json
from slurm_jobs import SKIPS, SMALL_ACCURACY_TARGET, SubmittedJob, data_args, explain, job_log, submit

pytestmark = SKIPS

# Every start of these jobs trains on the small MNIST with rank 0 sleeping 0.05 s after each step, so a
# signal sent once the first checkpoint exists still finds the job training (the numbers are unchanged).
SLOW_STEPS = "delay,point=step,rank=0,seconds=0.05,attempt=*"


def wait_for(what: str, predicate, waiting: SubmittedJob | None, seconds: float, explain_fn):
    deadline = time.monotonic() + seconds
    while True:
        found = predicate()
        if found:
            return found
        assert waiting is None or waiting.poll() is None, f"the job ended while waiting for {what}\n{explain_fn()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{explain_fn()}"
        time.sleep(0.1)


def finish(waiting: SubmittedJob, seconds: float, explain_fn) -> None:
    try:
        waiting.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        waiting.kill()
        pytest.fail("the job did not end\n" + explain_fn())


def signal_after_first_checkpoint(cluster, logs: Path, runs: Path, waiting: SubmittedJob,
                                  scancel_args: tuple[str, ...], seconds: float) -> str:
    """Once the job's first checkpoint exists (training is under way), ``scancel *scancel_args JOB``;
    waits for the job to end, successfully; returns its id."""
    jid = "?"
    try:
        log_file = wait_for("the job log", lambda: next(logs.glob("mnist-dist-*.out"), None), waiting, 60,
                            cluster.logs)
        jid = log_file.stem.rsplit("-", 1)[1]
        ckpt_dir = runs / f"slurm-{jid}" / "checkpoints"
        wait_for("a first checkpoint", lambda: list(ckpt_dir.glob("step-*.pt")), waiting, 240,
                 lambda: explain(cluster, logs, jid))
        cluster.run("scancel", *scancel_args, jid)
        finish(waiting, seconds, lambda: explain(cluster, logs, jid))
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, explain(cluster, logs, jid)
    return jid


def in_order(log: str, *markers: str) -> bool:
    positions = [log.find(marker) for marker in markers]
    return all(p >= 0 for p in positions) and positions == sorted(positions)


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes(cluster, job_dirs, small_mnist):
    logs, runs = job_dirs
    waiting = submit(cluster, logs, runs, *data_args(small_mnist), "--epochs", "4", "--checkpoint-every", "10",
                     options=("--nodes=2", "--cpus-per-task=1"), MNIST_DIST_FAULT=SLOW_STEPS)
    jid = signal_after_first_checkpoint(cluster, logs, runs, waiting, ("--batch", "--signal=USR1"), 530)
    log = job_log(logs, jid)
    assert in_order(log, "USR1 received", "stopped by signal", "requeueing job", "start #2", "resumed from",
                    "training step finished with exit code 0"), explain(cluster, logs, jid)
    summary = read_json(runs / f"slurm-{jid}" / "summary.json")
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= SMALL_ACCURACY_TARGET, summary
    assert summary["global_step"] == 4 * 23, summary


@pytest.mark.slow
def test_array_task_preempted_with_term_requeues_alone_and_resumes(cluster, job_dirs, small_mnist, record_property):
    # Two array tasks, one node each, the seed from the task index. Only task 0 is preempted, the way the
    # scheduler does it (PreemptMode with GraceTime): TERM to the job's steps — torchrun and the ranks,
    # not the batch shell. The ranks checkpoint; the task requeues itself (ARRAYID_0, not the whole
    # array), resumes from that checkpoint and finishes; task 1 runs untouched.
    logs, runs = job_dirs
    waiting = submit(cluster, logs, runs, *data_args(small_mnist), "--epochs", "4", "--checkpoint-every", "10",
                     "--seed", "$SLURM_ARRAY_TASK_ID", options=("--array=0-1", "--nodes=1", "--cpus-per-task=2"),
                     output="%x-%A_%a.out", timeout=600, MNIST_DIST_FAULT=SLOW_STEPS)
    array = "?"
    try:
        log_file = wait_for("task 0's log", lambda: next(logs.glob("mnist-dist-*_0.out"), None), waiting, 60,
                            cluster.logs)
        array = log_file.stem[len("mnist-dist-"):-len("_0")]
        task0 = f"{array}_0"
        ckpt_dir = runs / f"slurm-{task0}" / "checkpoints"
        wait_for("task 0's first checkpoint", lambda: list(ckpt_dir.glob("step-*.pt")), waiting, 240,
                 lambda: explain(cluster, logs, task0))
        signalled = time.time()
        cluster.run("scancel", "--signal=TERM", task0)  # the steps of task 0, as _preempt_signal does
        stop_line = wait_for(
            "task 0's stop checkpoint",
            lambda: re.search(r"stopped by signal SIGTERM .*; checkpoint (\S+);", job_log(logs, task0)),
            waiting, 120, lambda: explain(cluster, logs, task0))
        stop_checkpoint = stop_line.group(1)
        stop_seconds = Path(stop_checkpoint).stat().st_mtime - signalled
        record_property("term_to_checkpoint_seconds", round(stop_seconds, 2))
        print(f"TERM to checkpoint on disk: {stop_seconds:.2f} s")
        finish(waiting, 560, lambda: explain(cluster, logs, task0))
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, explain(cluster, logs, f"{array}_0") + explain(cluster, logs, f"{array}_1")
    log0, log1 = job_log(logs, f"{array}_0"), job_log(logs, f"{array}_1")
    assert in_order(log0, "stopped by signal SIGTERM", "on a signal to the job's steps",
                    f"requeueing job {array}_0", "start #2", f"resumed from {stop_checkpoint}",
                    "training step finished with exit code 0"), log0
    assert "TERM received" not in log0 and "USR1" not in log0  # the batch shell got none: the step's exit code 3
    assert "start #1" in log1 and "start #2" not in log1 and "stopped by signal" not in log1, log1
    assert "training step finished with exit code 0" in log1, log1
    assert sorted(p.name for p in runs.iterdir()) == [f"slurm-{array}_0", f"slurm-{array}_1"]
    for task in (0, 1):
        run_dir = runs / f"slurm-{array}_{task}"
        assert read_json(run_dir / "config.json")["config"]["seed"] == task
        summary = read_json(run_dir / "summary.json")
        assert summary["test_accuracy"] >= SMALL_ACCURACY_TARGET, summary


@pytest.mark.slow
def test_term_to_the_whole_job_requeues_and_resumes_from_the_last_periodic_checkpoint(cluster, job_dirs,
                                                                                      small_mnist):
    # scancel --full --signal=TERM (like the time limit) reaches the batch shell and srun too; srun turns
    # its TERM into SIGKILL of the ranks ("forcing job termination"), so there is no stop checkpoint.
    # The batch shell survives (trap), requeues, and the job resumes from its newest periodic checkpoint.
    logs, runs = job_dirs
    waiting = submit(cluster, logs, runs, *data_args(small_mnist), "--epochs", "4", "--checkpoint-every", "10",
                     options=("--nodes=1", "--cpus-per-task=2"), MNIST_DIST_FAULT=SLOW_STEPS)
    jid = signal_after_first_checkpoint(cluster, logs, runs, waiting, ("--full", "--signal=TERM"), 500)
    log = job_log(logs, jid)
    assert in_order(log, "TERM received by the batch shell", "stopped by TERM during training",
                    "requeueing job", "start #2", "resumed from", "training step finished with exit code 0"), log
    resumed = re.search(r"resumed from (\S+/step-(\d+)\.pt)", log)
    stopped = re.search(r"stopped by signal SIGTERM .*; checkpoint (\S+);", log)
    assert resumed, log
    if stopped:  # the ranks (signalled too) beat srun's SIGKILL: then that checkpoint is the newest
        assert resumed.group(1) == stopped.group(1), log
    else:  # killed first: the newest periodic checkpoint (every 10 steps) or epoch-end one (23, 46, 69)
        assert int(resumed.group(2)) % 10 == 0 or int(resumed.group(2)) % 23 == 0, log
    summary = read_json(runs / f"slurm-{jid}" / "summary.json")
    assert summary["test_accuracy"] >= SMALL_ACCURACY_TARGET, summary


def test_requeues_are_capped_by_max_requeues(cluster, job_dirs, small_mnist):
    # MAX_REQUEUES=0: a stop signal (here early, while the job is starting) ends the job with exit 3 and
    # the way to continue, instead of requeueing it (SLURM_RESTART_COUNT counts the requeues).
    logs, runs = job_dirs
    waiting = submit(cluster, logs, runs, *data_args(small_mnist), "--epochs", "4", "--checkpoint-every", "10",
                     options=("--nodes=1", "--cpus-per-task=2"), MAX_REQUEUES="0", timeout=300)
    jid = "?"
    try:
        log_file = wait_for("the job to start", lambda: next(
            (p for p in logs.glob("mnist-dist-*.out") if "start #1" in p.read_text()), None), waiting, 60,
            cluster.logs)
        jid = log_file.stem.rsplit("-", 1)[1]
        cluster.run("scancel", "--batch", "--signal=USR1", jid)
        finish(waiting, 300, lambda: explain(cluster, logs, jid))
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 3, explain(cluster, logs, jid)
    log = job_log(logs, jid)
    assert "USR1 received" in log and "start #2" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "(MAX_REQUEUES=0): not requeueing" in errors[0], log
    assert f"RUN_DIR={runs.resolve()}/slurm-{jid} sbatch" in errors[0], errors[0]


@pytest.mark.slow
def test_plain_scancel_cancels_instead_of_requeueing(cluster, job_dirs, small_mnist):
    # scancel (no --signal) also sends TERM to the batch shell first; the trap must not turn a
    # cancellation into a requeue.
    logs, runs = job_dirs
    waiting = submit(cluster, logs, runs, *data_args(small_mnist), "--epochs", "4",
                     options=("--nodes=1", "--cpus-per-task=2"), timeout=300, MNIST_DIST_FAULT=SLOW_STEPS)
    jid = "?"
    try:
        log_file = wait_for("the job to start", lambda: next(
            (p for p in logs.glob("mnist-dist-*.out") if "start #1" in p.read_text()), None), waiting, 60,
            cluster.logs)
        jid = log_file.stem.rsplit("-", 1)[1]
        cluster.run("scancel", jid)
        finish(waiting, 300, lambda: explain(cluster, logs, jid))
    finally:
        if waiting.poll() is None:
            waiting.kill()
    # the job is CANCELLED (its end) while its batch shell may still be finishing
    log = wait_for("the batch shell's last word", lambda: "not requeueing" in job_log(logs, jid) and
                   job_log(logs, jid), None, 30, lambda: explain(cluster, logs, jid))
    assert f"job {jid} is being cancelled" in log, log
    time.sleep(cluster.cred_expire + 5)  # a requeued job would be pending or running again by now
    queue = cluster.run("squeue", "-h", "-j", jid, "-o", "%T", check=False).stdout.strip()
    log = job_log(logs, jid)
    assert "requeueing job" not in log and "start #2" not in log and queue == "", f"{queue}\n{log}"
