"""docker/entrypoint.sh started by a cluster launcher (Kubernetes operators): it must not wrap
torchrun around a process that already is a rank, nor let its own `torchrun --standalone` override
the torchrun settings a launcher gave (PET_*). Dry runs for the decision, then real trainings
through the entrypoint, outside a container, as the two kinds of pods would run it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import QUIET, REPO, child_env, free_port, ok, read_json, run

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
BASH = shutil.which("bash") or "/bin/bash"
STANDALONE = ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "/app/train_ddp.py"]


def dry_run(*args: str, **env: str) -> list[str]:
    proc = subprocess.run([BASH, str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "ENTRYPOINT_DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("env, expected", [
    ({}, STANDALONE),  # no launcher: our own torchrun, one rank per visible GPU
    # PyTorchJob replica, one process per pod: the operator set WORLD_SIZE, RANK, MASTER_ADDR
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "job-master-0", "PET_NNODES": "2"},
     ["python", "/app/train_ddp.py"]),
    # TrainJob (torch-distributed runtime) or elastic PyTorchJob: torchrun's settings, no ranks yet
    ({"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_NPROC_PER_NODE": "auto"},
     ["python", "-m", "torch.distributed.run", "/app/train_ddp.py"]),
    # PyTorchJob with nprocPerNode 4: RANK is the pod's, torchrun must start the 4 ranks
    ({"WORLD_SIZE": "8", "RANK": "1", "PET_NPROC_PER_NODE": "4", "PET_NNODES": "2"},
     ["python", "-m", "torch.distributed.run", "/app/train_ddp.py"]),
    ({"PETS": "1", "WORLD_SIZE": "2"}, STANDALONE),  # neither: a lone WORLD_SIZE, a look-alike name
])
def test_launcher_decides_how_train_ddp_starts(env, expected):
    assert dry_run("--epochs", "2", **env) == [*expected, "--epochs", "2"]
    assert dry_run("train", "--epochs", "2", **env) == [*expected, "--epochs", "2"]
    assert dry_run("evaluate", "--run-dir", "r", **env) == ["python", "-m", "mnist_dist", "evaluate", "--run-dir", "r"]


def entrypoint(*args: str, **env: str) -> subprocess.Popen:
    e = child_env(PYTHON=sys.executable, MNIST_DIST_TRAIN_SCRIPT=str(REPO / "train_ddp.py"),
                  PYTHONPATH=str(REPO), **env)
    return subprocess.Popen([BASH, str(ENTRYPOINT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e, cwd=REPO, stdin=subprocess.DEVNULL)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"


def test_two_pytorchjob_pods_each_run_one_rank(small_mnist, tmp_path):
    """Two 'pods' with the variables the training operator sets (WORLD_SIZE, RANK, MASTER_ADDR,
    MASTER_PORT, PET_NNODES, PET_NODE_RANK): each entrypoint runs train_ddp.py as its rank."""
    out, port = tmp_path / "run", str(free_port())
    flags = ["--max-steps", "10", "--data-dir", str(small_mnist), "--out-dir", str(out), *QUIET]
    finish([entrypoint(*flags, WORLD_SIZE="2", RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       PET_NNODES="2", PET_NODE_RANK=str(r)) for r in (0, 1)])
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["launcher"] == "env" and summary["global_step"] == 10


@pytest.mark.slow
def test_trainjob_pet_variables_drive_torchrun(small_mnist, tmp_path):
    """One 'node' of a TrainJob: PET_NNODES=1, PET_NPROC_PER_NODE=2, PET_MASTER_*: the entrypoint's
    torchrun takes them (2 ranks from PET_NPROC_PER_NODE, none from its own GPU count)."""
    out = tmp_path / "run"
    proc = run([BASH, str(ENTRYPOINT), "--max-steps", "10", "--data-dir", str(small_mnist), "--out-dir", str(out),
                *QUIET], timeout=300,
               env=child_env(PYTHON=sys.executable, MNIST_DIST_TRAIN_SCRIPT=str(REPO / "train_ddp.py"),
                             PYTHONPATH=str(REPO), PET_NNODES="1", PET_NODE_RANK="0", PET_NPROC_PER_NODE="2",
                             PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port())))
    ok(proc)
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["launcher"] == "torchrun"
