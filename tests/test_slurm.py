"""slurm/train.sbatch on a real SLURM cluster: munged + slurmctld + two slurmd (node1, node2) on localhost.

Launching: one and two nodes, the rendezvous, CPU requests, the environment on the nodes, fail-fast
preflight. (Stop signals and arrays: test_slurm_stop.py; containers: test_slurm_containers.py.)

The cluster (tests/slurm_cluster.py) is started once per test session from a config written into a
temporary directory and stopped by PID afterwards, also on failure. Each node has 2 CPUs and two fake
GPUs (GRES backed by /dev/null) so that the GPU preflight can be exercised; CPU jobs do not ask for them.
Skips only when the SLURM/munge programs are not installed (CI installs slurm-wlm and munge), or when
not run as root (slurmd must start jobs as their user).
"""

from __future__ import annotations

import fcntl
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_json
from slurm_jobs import (ACCURACY_TARGET, SKIPS, data_args, explain, job_id,
                        job_log, sbatch)

pytestmark = SKIPS


@pytest.mark.slow
def test_one_node_job_meets_accuracy_target(cluster, job_dirs, mnist_root):
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(mnist_root), "--max-steps", "150",
                  options=("--nodes=1", "--cpus-per-task=2"))
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    summary = read_json(runs / f"slurm-{jid}" / "summary.json")
    assert summary["test_total"] == 10000
    assert summary["test_accuracy"] >= ACCURACY_TARGET, summary
    log = job_log(logs, jid)
    assert "preflight ok on node" in log and "rendezvous c10d at 127.0.0.1:" in log
    assert "2 CPU(s) per node, 2 thread(s) per rank" in log  # --cpus-per-task: the threads come from it
    assert read_json(runs / f"slurm-{jid}" / "config.json")["config"]["threads"] == 2


@pytest.mark.slow
def test_two_node_job_runs_ranks_on_both_nodes(cluster, job_dirs, small_mnist):
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist), options=("--nodes=2", "--cpus-per-task=1"))
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    summary = read_json(runs / f"slurm-{jid}" / "summary.json")
    assert summary["world_size"] >= 2 and summary["test_total"] == 1000, summary
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


@pytest.mark.slow
def test_preflight_fails_fast_when_allocated_gpus_are_not_visible(cluster, job_dirs, small_mnist):
    # the nodes' GPUs are fake (/dev/null): SLURM allocates them, torch sees none
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist),
                  options=("--nodes=2", "--cpus-per-task=1", "--gres=gpu:2"), timeout=180)
    jid = job_id(proc)
    assert proc.returncode == 2, explain(cluster, logs, jid, proc)
    log = job_log(logs, jid)
    assert re.search(r"error: preflight on node[12]: 2 GPU\(s\) allocated and 2 process\(es\) per node, "
                     r"but torch sees 0 CUDA device", log), log
    assert "no rank was started" in log and "agent on" not in log


@pytest.mark.slow
def test_missing_data_fails_before_any_rank(cluster, job_dirs, tmp_path):
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, "--data-dir", str(tmp_path / "nodata"), "--no-download",
                  options=("--nodes=2", "--cpus-per-task=1"), timeout=180)
    jid = job_id(proc)
    assert proc.returncode == 2, explain(cluster, logs, jid, proc)
    log = job_log(logs, jid)
    assert re.search(r"error: preflight on node[12]: MNIST files missing in .*nodata/MNIST/raw", log), log
    assert "agent on" not in log


def own_addresses() -> dict[str, str]:
    """Interface name -> IPv4 address of this machine (SIOCGIFADDR), without loopback and container bridges."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            if name == "lo" or name.startswith(("docker", "veth", "br-", "virbr")):
                continue
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


@pytest.mark.slow
def test_rendezvous_on_an_address_the_hostname_does_not_resolve_to(cluster, job_dirs, small_mnist):
    # A fast-network address (what slurm/README.md recommends for RDZV_HOST): torchrun's own guess of
    # which agent hosts the c10d store matches the endpoint against the hostname, finds no match on any
    # node, and no agent hosts it. The script tells node 0 (is_host=1) and the others (is_host=0).
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

    candidates = [ip for ip in own_addresses().values() if not _matches_machine_hostname(ip)]
    if not candidates:
        pytest.skip(f"every address of this machine matches its hostname for torchrun ({own_addresses()})")
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist), "--max-steps", "20",
                  options=("--nodes=2", "--cpus-per-task=1"), RDZV_HOST=candidates[0], timeout=300)
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    assert read_json(runs / f"slurm-{jid}" / "summary.json")["world_size"] == 2
    log = job_log(logs, jid)
    assert f"rendezvous c10d at {candidates[0]}:" in log
    assert re.search(rf"^preflight ok on node1: .*rendezvous {re.escape(candidates[0])}:\d+ is this node's, "
                     r"reached by node2$", log, re.M), log
    agents = dict(re.findall(r"^\d: agent on (node\d) .*, is_host=(\d)$", log, re.M))
    assert agents == {"node1": "1", "node2": "0"}, log


@pytest.mark.slow
def test_cpus_per_gpu_and_mem_per_gpu_requests_are_accepted_and_used(cluster, job_dirs, small_mnist):
    # --cpus-per-gpu cannot be combined with --cpus-per-task (the script used to set it): sbatch refused.
    # Without --cpus-per-task the step gets every CPU of the node (here 2 GPUs x 1), split between ranks.
    # The GPUs are fake, so GPUS_PER_NODE=0 makes the ranks train on the CPU with that allocation.
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist), "--max-steps", "20",
                  options=("--nodes=1", "--gpus-per-node=2", "--cpus-per-gpu=1", "--mem-per-gpu=64M"),
                  GPUS_PER_NODE="0", timeout=300)
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    log = job_log(logs, jid)
    assert "0 GPU(s) and 2 CPU(s) per node, 2 thread(s) per rank" in log, log
    assert read_json(runs / f"slurm-{jid}" / "config.json")["config"]["threads"] == 2


@pytest.mark.slow
def test_export_none_with_setup_loads_the_environment_on_every_node(cluster, job_dirs, small_mnist):
    # sbatch --export=NONE: the job starts with a login environment, not ours; SETUP brings our venv and
    # the checkout (on every node), and the steps must inherit it (SLURM_EXPORT_ENV=NONE would not).
    logs, runs = job_dirs
    activate = Path(sys.prefix) / "bin" / "activate"
    load = f"source {activate}" if activate.is_file() else f"export PATH={Path(sys.executable).parent}:$PATH"
    setup = (f"{load}; export PYTHONPATH={REPO} RUNS_DIR={runs} MNIST_DIST_ALLOW_SUBSET=1; "
             f"echo setup ran on $(hostname)")
    assert "," not in setup  # sbatch --export splits on commas
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist), "--max-steps", "20",
                  options=("--nodes=2", "--cpus-per-task=1", f"--export=NONE,SETUP={setup}"), timeout=300)
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    assert read_json(runs / f"slurm-{jid}" / "summary.json")["world_size"] == 2
    log = job_log(logs, jid)
    assert "SETUP: source " in log or "SETUP: export PATH" in log
    # once in the batch shell, then in each of the two steps (preflight, torchrun) on both nodes
    assert len(re.findall(r"^(\d: )?setup ran on ", log, re.M)) == 5, log


def test_python_without_the_project_is_one_error_with_a_hint(cluster, job_dirs, small_mnist, tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    logs, runs = job_dirs
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist),
                  options=("--nodes=1", f"--export=NONE,PYTHON={bare}/bin/python"), timeout=180)
    jid = job_id(proc)
    assert proc.returncode == 2, explain(cluster, logs, jid, proc)
    log = job_log(logs, jid)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "import torch, mnist_dist" in errors[0] and "SETUP=" in errors[0], log
    assert "preflight" not in log and "agent on" not in log
