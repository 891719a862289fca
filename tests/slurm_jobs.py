"""Submitting slurm/train.sbatch to the local test cluster (tests/slurm_cluster.py) and reading its results.

Shared by the test_slurm*.py modules and test_sweep.py's SLURM launcher test: one cluster for the
session (conftest.py's session-scoped ``cluster`` fixture); their tests run on one pytest-xdist worker
(``SKIPS`` carries ``xdist_group("slurm")``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET, REPO, child_env
from slurm_cluster import SlurmCluster, missing_binaries

SBATCH = REPO / "slurm" / "train.sbatch"
ACCURACY_TARGET = 0.95  # a short run (--max-steps 150 of the default recipe); a full epoch reaches ~0.99
SMALL_ACCURACY_TARGET = 0.9  # a few epochs of the small MNIST (conftest.small_mnist)

SKIPS = [
    pytest.mark.skipif(bool(missing_binaries()),
                       reason=f"SLURM/munge not installed (missing {', '.join(missing_binaries())}); "
                              f"apt-get install slurm-wlm munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root (slurmd runs jobs as their user)"),
    pytest.mark.xdist_group("slurm"),  # one cluster per session: all its tests on one worker
]


def on_the_cluster(test):
    """``SKIPS`` (and the xdist group) for one test of a module that is not all SLURM."""
    for mark in SKIPS:
        test = mark(test)
    return test


def job_env(cluster: SlurmCluster, runs: Path, **extra: str) -> dict[str, str]:
    # the job inherits this environment (sbatch --export=ALL): our python and the worktree's package
    return cluster.env(child_env(**{"PYTHON": sys.executable, "RUNS_DIR": str(runs), "PYTHONPATH": str(REPO),
                                    **extra}))


# JobState values after which a job (or array task) runs no more; a requeued job is PENDING again
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}


class SubmittedJob:
    """A batch job submitted with ``sbatch --parsable`` and waited for as ``sbatch --wait`` would (the
    exit code is the highest of its tasks'; requeues are waited through), but polled every 0.25 s:
    ``sbatch --wait`` polls after 2, 4, 6, 8, then every 10 s, which made every job here last a
    multiple of those. Speaks enough of ``subprocess.Popen`` (``poll``, ``communicate``, ``kill``,
    ``returncode``) for the tests that signal a job while it runs."""

    def __init__(self, cluster: SlurmCluster, cmd: list[str], env: dict[str, str], timeout: float) -> None:
        self.cluster, self.returncode = cluster, None
        self.deadline = time.monotonic() + timeout
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
                              stdin=subprocess.DEVNULL)
        self.stdout, self.stderr = proc.stdout, proc.stderr
        self.stdout_text, self.stderr_text = proc.stdout, proc.stderr
        if proc.returncode != 0:  # refused at submission: sbatch's own exit code, as with --wait
            self.returncode, self.job = proc.returncode, None
            return
        self.job = proc.stdout.strip().splitlines()[-1].split(";")[0]

    def poll(self) -> int | None:
        if self.returncode is not None or self.job is None:
            return self.returncode
        out = self.cluster.run("scontrol", "show", "job", "-o", self.job, check=False).stdout
        tasks = [dict(t.split("=", 1) for t in line.split() if "=" in t) for line in out.splitlines() if line]
        if not tasks:  # purged (MinJobAge) before a poll saw it finish: should not happen at 0.25 s
            self.returncode = 0 if "COMPLETED" in getattr(self, "_last", "") else 1
            return self.returncode
        self._last = " ".join(t.get("JobState", "") for t in tasks)
        if all(t.get("JobState") in FINISHED for t in tasks):
            self.returncode = max(int(t.get("ExitCode", "1:0").split(":")[0]) for t in tasks)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = min(self.deadline, time.monotonic() + timeout) if timeout is not None else self.deadline
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"job {self.job}", timeout or 0)
            time.sleep(0.25)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout, self.stderr

    def kill(self) -> None:
        if self.job is not None and self.poll() is None:
            self.cluster.run("scancel", "--full", self.job, check=False)


def submit(cluster: SlurmCluster, logs: Path, runs: Path, *args: str, options: tuple[str, ...] = (),
           timeout: int = 500, output: str = "%x-%j.out", **env: str) -> SubmittedJob:
    """slurm/train.sbatch submitted; its ``SubmittedJob`` (wait for it, or signal it first)."""
    cmd = ["sbatch", "--parsable", f"--output={logs}/{output}", *options, str(SBATCH), *args]
    return SubmittedJob(cluster, cmd, job_env(cluster, runs, **env), timeout)


def sbatch(cluster: SlurmCluster, logs: Path, runs: Path, *args: str, options: tuple[str, ...] = (),
           timeout: int = 400, **env: str) -> SubmittedJob:
    """slurm/train.sbatch submitted and waited for: ``returncode`` is the job's exit code."""
    job = submit(cluster, logs, runs, *args, options=options, timeout=timeout, **env)
    try:
        job.wait()
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"job {job.job} did not end within {timeout} s\n{cluster.logs()}")
    return job


def job_id(proc) -> str:
    ids = re.findall(r"^(\d+)", proc.stdout, re.M)
    assert ids, f"no job id from sbatch:\n{proc.stdout}\n{proc.stderr}"
    return ids[0]


def job_log(logs: Path, jid: str) -> str:
    path = logs / f"mnist-dist-{jid}.out"
    return path.read_text(errors="replace") if path.exists() else "<no log>"


def explain(cluster: SlurmCluster, logs: Path, jid: str, proc=None) -> str:
    head = f"job exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n" if proc is not None else ""
    return f"{head}--- job log\n{job_log(logs, jid)}\n--- job\n{cluster.job_info(jid)}\n{cluster.logs()}"


def data_args(mnist_root: Path) -> list[str]:
    return ["--data-dir", str(mnist_root), *QUIET]
