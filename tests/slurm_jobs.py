"""Submitting slurm/train.sbatch to the local test cluster (tests/slurm_cluster.py) and reading its results.

Shared by the test_slurm*.py modules; each starts its own cluster (conftest.py's module-scoped
``cluster`` fixture), so that a module can run alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUIET, REPO, child_env
from slurm_cluster import SlurmCluster, missing_binaries

SBATCH = REPO / "slurm" / "train.sbatch"
ACCURACY_TARGET = 0.95  # a short run (--max-steps 150 of the default recipe); a full epoch reaches ~0.99

SKIPS = [
    pytest.mark.skipif(bool(missing_binaries()),
                       reason=f"SLURM/munge not installed (missing {', '.join(missing_binaries())}); "
                              f"apt-get install slurm-wlm munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root (slurmd runs jobs as their user)"),
]


def job_env(cluster: SlurmCluster, runs: Path, **extra: str) -> dict[str, str]:
    # the job inherits this environment (sbatch --export=ALL): our python and the worktree's package
    return cluster.env(child_env(**{"PYTHON": sys.executable, "RUNS_DIR": str(runs), "PYTHONPATH": str(REPO),
                                    **extra}))


def sbatch(cluster: SlurmCluster, logs: Path, runs: Path, *args: str, options: tuple[str, ...] = (),
           wait: bool = True, timeout: int = 400, **env: str) -> subprocess.CompletedProcess:
    cmd = ["timeout", str(timeout), "sbatch", "--parsable", f"--output={logs}/%x-%j.out",
           *(["--wait"] if wait else []), *options, str(SBATCH), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=job_env(cluster, runs, **env),
                              timeout=timeout + 30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbatch hung: {' '.join(cmd)}\n{cluster.logs()}")


def job_id(proc: subprocess.CompletedProcess) -> str:
    ids = re.findall(r"^(\d+)", proc.stdout, re.M)
    assert ids, f"no job id from sbatch:\n{proc.stdout}\n{proc.stderr}"
    return ids[0]


def job_log(logs: Path, jid: str) -> str:
    path = logs / f"mnist-dist-{jid}.out"
    return path.read_text(errors="replace") if path.exists() else "<no log>"


def explain(cluster: SlurmCluster, logs: Path, jid: str, proc=None) -> str:
    head = f"sbatch exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n" if proc is not None else ""
    return f"{head}--- job log\n{job_log(logs, jid)}\n--- job\n{cluster.job_info(jid)}\n{cluster.logs()}"


def data_args(mnist_root: Path) -> list[str]:
    return ["--data-dir", str(mnist_root), *QUIET]
