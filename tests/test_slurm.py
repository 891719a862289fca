"""slurm/train.sbatch on a real SLURM cluster: munged + slurmctld + two slurmd (node1, node2) on localhost.

The cluster (tests/slurm_cluster.py) is started once for this module from a config written into a
temporary directory and stopped by PID afterwards, also on failure. Each node has 2 CPUs and two fake
GPUs (GRES backed by /dev/null) so that the GPU preflight can be exercised; CPU jobs do not ask for them.
Skips only when the SLURM/munge programs are not installed (CI installs slurm-wlm and munge), or when
not run as root (slurmd must start jobs as their user).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import QUIET, REPO, child_env, read_json
from slurm_cluster import SlurmCluster, missing_binaries

SBATCH = REPO / "slurm" / "train.sbatch"
ACCURACY_TARGET = 0.95  # a short run (--max-steps 150 of the default recipe); a full epoch reaches ~0.99

pytestmark = [
    pytest.mark.skipif(bool(missing_binaries()),
                       reason=f"SLURM/munge not installed (missing {', '.join(missing_binaries())}); "
                              f"apt-get install slurm-wlm munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root (slurmd runs jobs as their user)"),
]


@pytest.fixture(scope="module")
def cluster():
    # not under pytest's tmp dir: that is mode 0700 and munged runs as the munge user
    root = Path(tempfile.mkdtemp(prefix="mnist-dist-slurm-"))
    try:
        with SlurmCluster(root, nodes=2, cpus=2, gpus_per_node=2) as c:
            yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def job_dirs(tmp_path):
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    logs.mkdir()
    runs.mkdir()
    return logs, runs


def job_env(cluster: SlurmCluster, runs: Path, **extra: str) -> dict[str, str]:
    # the job inherits this environment (sbatch --export=ALL): our python and the worktree's package
    return cluster.env(child_env(PYTHON=sys.executable, RUNS_DIR=str(runs), PYTHONPATH=str(REPO), **extra))


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


def test_one_node_job_meets_accuracy_target(cluster, job_dirs, mnist_root):
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(mnist_root), "--max-steps", "150", options=("--nodes=1",))
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    summary = read_json(runs / f"slurm-{jid}" / "summary.json")
    assert summary["test_total"] == 10000
    assert summary["test_accuracy"] >= ACCURACY_TARGET, summary
    log = job_log(logs, jid)
    assert "preflight ok on node" in log and "rendezvous c10d at 127.0.0.1:" in log


def test_two_node_job_runs_ranks_on_both_nodes(cluster, job_dirs, mnist_root):
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(mnist_root), "--max-steps", "60",
                  options=("--nodes=2", "--cpus-per-task=1"))
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    summary = read_json(runs / f"slurm-{jid}" / "summary.json")
    assert summary["world_size"] >= 2 and summary["test_total"] == 10000, summary
    log = job_log(logs, jid)
    # srun --label prefixes each line with the task (= node) index; each node's agent names its node,
    # and torchrun (LOGLEVEL=INFO) logs the global ranks it started.
    nodes = dict(re.findall(r"^(\d+): agent on (node\d+) ", log, re.M))
    assert sorted(nodes.values()) == ["node1", "node2"], explain(cluster, logs, jid)
    ranks_by_node: dict[str, set[int]] = {}
    for task, ranks in re.findall(r"^(\d+): .*global_ranks=\[([\d, ]+)\]", log, re.M):
        ranks_by_node.setdefault(nodes[task], set()).update(int(r) for r in ranks.split(","))
    assert set(ranks_by_node) == {"node1", "node2"}, explain(cluster, logs, jid)
    assert set().union(*ranks_by_node.values()) == set(range(summary["world_size"]))
    assert not ranks_by_node["node1"] & ranks_by_node["node2"]


def test_preemption_checkpoints_requeues_and_resumes(cluster, job_dirs, mnist_root):
    logs, runs = job_dirs
    cmd = ["timeout", "500", "sbatch", "--parsable", "--wait", f"--output={logs}/%x-%j.out", "--nodes=2",
           "--cpus-per-task=1",
           str(SBATCH), *data_args(mnist_root), "--epochs", "2", "--checkpoint-every", "20"]
    waiting = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=job_env(cluster, runs), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(logs.glob("mnist-dist-*.out")):
            assert waiting.poll() is None and time.monotonic() < deadline, waiting.communicate()
            time.sleep(0.2)
        jid = next(logs.glob("mnist-dist-*.out")).stem.rsplit("-", 1)[1]
        ckpt_dir = runs / f"slurm-{jid}" / "checkpoints"
        deadline = time.monotonic() + 240
        while not list(ckpt_dir.glob("step-*.pt")):  # training is under way: preempt it now
            assert waiting.poll() is None and time.monotonic() < deadline, explain(cluster, logs, jid)
            time.sleep(0.2)
        cluster.run("scancel", "--batch", "--signal=USR1", jid)
        try:
            out, err = waiting.communicate(timeout=530)  # sbatch --wait returns when the requeued job ends
        except subprocess.TimeoutExpired:
            pytest.fail("sbatch --wait hung\n" + explain(cluster, logs, jid))
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, f"{out}{err}\n" + explain(cluster, logs, jid)
    log = job_log(logs, jid)
    order = ["USR1 received", "stopped by signal", "requeueing job", "start #2", "resumed from",
             "training step finished with exit code 0"]
    positions = [log.find(marker) for marker in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), explain(cluster, logs, jid)
    summary = read_json(runs / f"slurm-{jid}" / "summary.json")
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= ACCURACY_TARGET, summary


def test_preflight_fails_fast_when_allocated_gpus_are_not_visible(cluster, job_dirs, mnist_root):
    # the nodes' GPUs are fake (/dev/null): SLURM allocates them, torch sees none
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(mnist_root),
                  options=("--nodes=2", "--cpus-per-task=1", "--gres=gpu:2"), timeout=180)
    jid = job_id(proc)
    assert proc.returncode == 2, explain(cluster, logs, jid, proc)
    log = job_log(logs, jid)
    assert re.search(r"error: preflight on node[12]: 2 GPU\(s\) allocated and 2 process\(es\) per node, "
                     r"but torch sees 0 CUDA device", log), log
    assert "no rank was started" in log and "agent on" not in log


def test_missing_data_fails_before_any_rank(cluster, job_dirs, tmp_path):
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, "--data-dir", str(tmp_path / "nodata"), "--no-download",
                  options=("--nodes=2", "--cpus-per-task=1"), timeout=180)
    jid = job_id(proc)
    assert proc.returncode == 2, explain(cluster, logs, jid, proc)
    log = job_log(logs, jid)
    assert re.search(r"error: preflight on node[12]: MNIST files missing in .*nodata/MNIST/raw", log), log
    assert "agent on" not in log


APPTAINER_STAND_IN = r"""#!/bin/bash
# Stand-in for `apptainer exec [--nv] [--bind A,B] [--pwd DIR] IMAGE CMD...` (no Apptainer on CI):
# logs the call, then runs CMD on the host with the image's /app mapped to the checkout.
printf '%s %s\n' "${SLURMD_NODENAME:-batch}" "$*" >>"$STAND_IN_LOG"
[[ $1 == exec ]] || exit 64
shift
pwd_dir=
while [[ $1 == --* ]]; do
  case $1 in
  --nv) shift ;;
  --bind) shift 2 ;;
  --pwd) pwd_dir=$2; shift 2 ;;
  *) exit 64 ;;
  esac
done
[[ -f $1 ]] || exit 65
shift
if [[ -n $pwd_dir ]]; then cd "${pwd_dir/#\/app/$STAND_IN_APP}" || exit 66; fi
args=()
for a in "$@"; do
  a=${a/#\/app\//$STAND_IN_APP/}
  [[ $a == python ]] && a=$STAND_IN_PYTHON
  args+=("$a")
done
exec "${args[@]}"
"""


def test_container_mode_runs_every_step_through_apptainer(cluster, job_dirs, mnist_root, tmp_path):
    # The sbatch script's CONTAINER_IMAGE path, with a stand-in for the apptainer binary (see above).
    logs, runs = job_dirs
    bindir, image, calls = tmp_path / "bin", tmp_path / "mnist-dist.sif", tmp_path / "apptainer.calls"
    bindir.mkdir()
    (bindir / "apptainer").write_text(APPTAINER_STAND_IN)
    (bindir / "apptainer").chmod(0o755)
    image.write_bytes(b"not a real image")
    proc = sbatch(cluster, logs, runs, *data_args(mnist_root), "--max-steps", "20",
                  options=("--nodes=2", "--cpus-per-task=1"), timeout=300, CONTAINER_IMAGE=str(image),
                  PATH=f"{bindir}:{os.environ['PATH']}", STAND_IN_LOG=str(calls), STAND_IN_APP=str(REPO),
                  STAND_IN_PYTHON=sys.executable)
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    assert read_json(runs / f"slurm-{jid}" / "summary.json")["world_size"] == 2
    prefix = f"exec --nv --bind {mnist_root.resolve()},{runs.resolve()} --pwd /app {image} python -m "
    lines = calls.read_text().splitlines()
    download = f"{prefix}mnist_dist download --data-dir {mnist_root.resolve()}"
    assert [line.split(" ", 1)[1] for line in lines].count(download) == 1, lines  # once, on the batch node
    for node in ("node1", "node2"):
        assert any(line.startswith(f"{node} {prefix}mnist_dist.preflight ") for line in lines), lines
        assert any(line.startswith(f"{node} {prefix}torch.distributed.run ") and " /app/train_ddp.py " in line
                   for line in lines), lines
