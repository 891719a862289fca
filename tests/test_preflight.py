"""mnist_dist.preflight run for real, as the sbatch script runs it on each node (SLURM_NODEID picks the
first node): the rendezvous address must be the first node's own, its port free, and every other node
must reach it over TCP before torchrun starts. Several "nodes" here are processes on this machine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CliResult, assert_one_line_error, child_env, free_port, run

NOT_OURS = "203.0.113.77"  # TEST-NET-3: documentation only, never assigned to a machine


def preflight(mnist_root: Path, endpoint: str) -> list[str]:
    return [sys.executable, "-m", "mnist_dist.preflight", "--nproc-per-node", "1", "--data-dir",
            str(mnist_root), "--rdzv-endpoint", endpoint]


def node_env(node_id: int, name: str, **extra: str) -> dict[str, str]:
    env = child_env(SLURM_NODEID=str(node_id), SLURMD_NODENAME=name, **extra)
    env.pop("SLURM_JOB_NUM_NODES", None)
    return env


@pytest.fixture
def preflight_here(monkeypatch, capsys):
    """``python -m mnist_dist.preflight ARGS`` on "node" NODE_ID, run in this process."""
    from mnist_dist import preflight as module

    def call(args: list[str], node_id: int, name: str) -> CliResult:
        monkeypatch.setenv("SLURM_NODEID", str(node_id))
        monkeypatch.setenv("SLURMD_NODENAME", name)
        monkeypatch.delenv("SLURM_JOB_NUM_NODES", raising=False)
        capsys.readouterr()
        code = module.main(args[3:])  # without `python -m mnist_dist.preflight`
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return call


def listening(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until something accepts on the port (a bare connection: the first node ignores it)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first node never listened"
            time.sleep(0.2)


@pytest.mark.slow
def test_first_node_and_two_others_meet_on_the_rendezvous_port(mnist_root):
    endpoint = f"127.0.0.1:{free_port()}"
    args = [*preflight(mnist_root, endpoint), "--token", "job7.0.123"]
    first = subprocess.Popen([*args, "--nnodes", "3", "--reach-timeout", "60"], env=node_env(0, "alpha"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        listening(int(endpoint.rsplit(":", 1)[1]), first)
        # another job using the same port (its own token) must neither count nor be answered
        impostor = run([*preflight(mnist_root, endpoint), "--token", "job8.0.999", "--reach-timeout", "3"],
                       env=node_env(1, "beta"), timeout=60)
        assert impostor.returncode == 2 and "no answer to this job's token" in impostor.stderr, impostor.stderr
        others = [subprocess.Popen([*args, "--reach-timeout", "60"], env=node_env(i, name),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for i, name in ((1, "beta"), (2, "gamma"))]
        outputs = [p.communicate(timeout=120) for p in others]
        out, err = first.communicate(timeout=120)
    finally:
        for p in [first, *locals().get("others", [])]:
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0, err
    assert all(p.returncode == 0 for p in others), outputs
    assert f"rendezvous {endpoint} is this node's, reached by " in out
    reached = out.split("reached by ", 1)[1].strip().split(", ")
    assert sorted(reached) == ["beta", "gamma"], out
    assert all(f"rendezvous {endpoint} reached" in o for o, _ in outputs), outputs
    # the port is free again for torchrun's store (bound as the c10d store binds it)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", int(endpoint.rsplit(":", 1)[1])))


def test_rendezvous_address_that_is_not_the_first_nodes_own_fails(mnist_root):
    """(a real process: the exit code and the line as sbatch's shell sees them)"""
    proc = run(preflight(mnist_root, f"{NOT_OURS}:{free_port()}"), env=node_env(0, "alpha"), timeout=60)
    assert proc.returncode == 2
    assert_one_line_error(proc, "preflight on alpha", f"rendezvous address {NOT_OURS} is not an address of "
                                                      "the first node", "RDZV_HOST")


def test_other_node_that_cannot_reach_the_rendezvous_fails(mnist_root, preflight_here):
    # nothing listens there: the first node's preflight never came up (or a firewall drops the port)
    proc = preflight_here([*preflight(mnist_root, f"127.0.0.1:{free_port()}"), "--reach-timeout", "2"], 1, "beta")
    assert proc.returncode == 2
    assert_one_line_error(proc, "preflight on beta", "cannot reach the rendezvous 127.0.0.1:", "RDZV_HOST")


def test_first_node_names_how_many_nodes_never_arrived(mnist_root, preflight_here):
    proc = preflight_here([*preflight(mnist_root, f"127.0.0.1:{free_port()}"), "--nnodes", "2",
                           "--reach-timeout", "2"], 0, "alpha")
    assert proc.returncode == 2
    assert_one_line_error(proc, "only 0 of the 1 other node(s) reached the rendezvous 127.0.0.1:")


def test_rendezvous_port_in_use_on_the_first_node_fails(mnist_root, preflight_here):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = preflight_here(preflight(mnist_root, f"127.0.0.1:{port}"), 0, "alpha")
    assert proc.returncode == 2
    assert_one_line_error(proc, f"rendezvous port {port} is already in use", "RDZV_PORT")


def test_torch_that_does_not_import_is_one_error_with_a_hint(mnist_root, tmp_path):
    shadow = tmp_path / "torch"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('a broken torch on PYTHONPATH')\n")
    repo = Path(__file__).resolve().parents[1]
    proc = run(preflight(mnist_root, ""), env=node_env(0, "alpha", PYTHONPATH=f"{tmp_path}:{repo}"),
               timeout=60)
    assert proc.returncode == 2
    assert_one_line_error(proc, "preflight on alpha", "torch does not import", "a broken torch on PYTHONPATH",
                          "SETUP=")
