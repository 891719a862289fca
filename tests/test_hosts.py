"""Across hosts: two simulated hosts (tests/netns_hosts.py: network namespaces behind a bridge, each
with its own hostname, /etc/hosts and private run directory), torchrun's c10d rendezvous on host A,
real packets dropped. Root only; skipped, saying why, where namespaces or iptables are missing.

* two hosts × 1 rank train to the accuracy of one host × 2 ranks with the same flags;
* a partition of host B mid-run: both sides end with exit code 4 within --dist-timeout + 60 s, host A
  naming rank 1 as missing, host B saying it lost the store and its peers; so does a rank that is
  stuck in its own code on the cut-off host (its watchdog thread ends it);
* the heartbeat store's calls keep their deadline on a cut-off host (a TCPStore call there blocks
  until TCP gives up, ~15 min), and the store answers again once the network heals;
* two dumps written at the same moment by two threads do not collide (no root needed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import QUIET, REPO, TRAIN_SCRIPT, child_env, ok, read_json
from mnist_dist.dist import usable_cpu_count
from netns_hosts import Hosts, unavailable

pytestmark = pytest.mark.xdist_group("hosts")  # one at a time: their timings are the point

TIMEOUT = 20  # --dist-timeout of the partition test
RDZV_PORT = 29400  # each host has its own port space: no collisions with anything else


@pytest.fixture
def hosts(tmp_path):
    why = unavailable()
    if why:
        pytest.skip(why)
    with Hosts(tmp_path / "hosts", ["host-a", "host-b"]) as h:  # killed and deleted also when a test fails
        yield h


def launch(hosts: Hosts, data: Path, *flags: str, env: dict[str, str] | None = None, torchrun: tuple = (),
           order: tuple = (), endpoint: str = "") -> dict[str, subprocess.Popen]:
    """torchrun on every host (1 rank each; c10d rendezvous on host A unless ``torchrun`` says otherwise),
    output into <root>/<host>.log; the data copied into each host's private directory (no shared storage)."""
    procs = {}
    for name in order or hosts.names:
        shutil.copytree(data, hosts.private(name) / "data")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(hosts.names)}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint or hosts.address['host-a']}:{RDZV_PORT}", "--rdzv-id=hosts",
               *torchrun, str(TRAIN_SCRIPT), "--data-dir", str(hosts.mount_point / "data"), "--out-dir",
               str(hosts.mount_point / "run"), *flags]
        log = open(hosts.root / f"{name}.log", "w")  # noqa: SIM115 - the process holds it
        procs[name] = hosts.popen(name, cmd, env=env or child_env(PYTHONPATH=str(REPO)), cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT)
        log.close()
    return procs


def log_of(hosts: Hosts, name: str) -> str:
    return (hosts.root / f"{name}.log").read_text(errors="replace")


def wait_all(hosts: Hosts, procs: dict[str, subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not end within {timeout} s\n" +
                        "\n".join(f"--- {n}:\n{log_of(hosts, n)[-3000:]}" for n in procs))


def first_checkpoint(hosts: Hosts, procs: dict[str, subprocess.Popen]) -> int:
    """Wait for host A's first checkpoint (the run is training); host B's rank's pid."""
    checkpoints = hosts.private("host-a") / "run" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(checkpoints.glob("step-*.pt")):
        assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline, \
            "\n".join(f"--- {n}:\n{log_of(hosts, n)[-3000:]}" for n in procs)
        time.sleep(0.1)
    children = subprocess.run(["pgrep", "-P", str(procs["host-b"].pid)], capture_output=True, text=True, check=True)
    return int(children.stdout.split()[0])


def exited(pid: int) -> int | None:
    """The exit status of a child process that ended (a zombie its launcher has not reaped yet: its code
    is in /proc/PID/stat), -1 if it is gone, None while it runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[-1]) >> 8 if fields[0] == "Z" else None


# ----------------------------------------------------------------------------- the harness itself
@pytest.mark.slow
def test_faults_drop_and_hold_real_packets(hosts):
    """A TCP connection from A to B: through; partitioned (both ways); healed; 1 MB under a 2 Mbit/s cap."""
    server = [sys.executable, "-c", "import socket\ns = socket.create_server(('', 5000))\nwhile True:\n"
              "    c = s.accept()[0]\n    while c.recv(65536): pass\n    c.close()"]
    hosts.popen("host-b", server)
    send = [sys.executable, "-c", "import socket, sys, time\nt = time.monotonic()\ns = socket.create_connection("
            "('host-b', 5000), timeout=3)\ns.settimeout(60)\ns.sendall(b'x' * int(sys.argv[1]))\n"
            "s.shutdown(socket.SHUT_WR)\ns.recv(1)\nprint(time.monotonic() - t)"]  # 3 s to connect
    assert hosts.run("host-a", ["hostname"]).stdout.strip() == "host-a"
    deadline = time.monotonic() + 60
    while (through := hosts.run("host-a", [*send, "1"])).returncode != 0:  # the server is starting
        assert time.monotonic() < deadline, through.stderr
        time.sleep(0.2)
    hosts.partition("host-b")
    cut = hosts.run("host-a", [*send, "1"])
    assert cut.returncode != 0 and "timed out" in cut.stderr, cut
    hosts.heal("host-b")
    healed = hosts.run("host-a", [*send, "1"])
    assert healed.returncode == 0, healed
    hosts.cap("host-b", "2mbit", "16kbit")
    capped = hosts.run("host-a", [*send, str(2 ** 20)], timeout=60)
    assert capped.returncode == 0 and float(capped.stdout) > 3.0, capped  # 8 Mbit at 2 Mbit/s: ~4 s


@pytest.mark.slow
def test_store_calls_keep_their_deadline_on_a_cut_off_host(hosts):
    """Host B's heartbeat store (a TCPStore client of host A's store): partitioned, every call returns
    within its deadline (the one that hangs is abandoned, later ones fail at once); healed, it answers."""
    hosts.popen("host-a", [sys.executable, "-c", "import time, torch.distributed as d\n"
                           "s = d.TCPStore('0.0.0.0', 29500, is_master=True, wait_for_workers=False)\n"
                           "time.sleep(600)"], env=child_env())
    proc = hosts.popen("host-b", [sys.executable, "-c", STORE_CLIENT], env=child_env(PYTHONPATH=str(REPO)),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready"), line + proc.stderr.read()
    hosts.partition("host-b")
    cut_line = proc.stdout.readline()
    hosts.heal("host-b")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and cut_line, cut_line + err
    cut, healed = json.loads(cut_line), json.loads(out.strip().splitlines()[-1])
    assert cut["first_seconds"] <= 2.0 + 0.5 and cut["first_answered"] is False, cut  # its deadline: 2 s
    assert cut["then_seconds"] < 0.2 and cut["lost_for"] >= 2.0, cut  # later calls fail at once
    assert "has not answered" in cut["error"], cut
    assert healed["answered"] and healed["beat"] == {"beat": 2}, healed


# ----------------------------------------------------------------------------- training across hosts
@pytest.mark.slow
def test_two_hosts_train_like_one_host_with_two_ranks(hosts, small_mnist, reference_runs):
    """2 hosts × 1 rank, private run directories, c10d rendezvous on host A's address: the same test
    accuracy as the session's 1-host 2-rank run of the same flags (tests/test_train.py's)."""
    flags = ("--seed", "3", "--epochs", "2", *QUIET)
    one_host = read_json(reference_runs.get(*flags[:4], "--data-dir", str(small_mnist), *QUIET, nproc=2)
                         / "summary.json")
    # --threads 1: the reference's ranks share 2 cores (1 thread each); here each host would take 2
    procs = launch(hosts, small_mnist, *flags, "--threads", "1")
    wait_all(hosts, procs, timeout=240)
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{log_of(hosts, name)}"
    run_a, run_b = hosts.private("host-a") / "run", hosts.private("host-b") / "run"
    summary = read_json(run_a / "summary.json")
    assert not (run_b / "summary.json").exists(), "host B's run directory is its own (rank 0 writes the summary)"
    network = read_json(run_a / "config.json")["network"]
    assert [(r["host"], r["address"]) for r in network["ranks"]] == [("host-a", "10.77.0.1"), ("host-b", "10.77.0.2")]
    assert summary["world_size"] == 2 and summary["test_accuracy"] > 0.9, summary
    # the same per-rank threads (1, on 2 cores): the same numbers, bit for bit (measured: 962/1000 both)
    same_threads = usable_cpu_count() // 2 == 1
    assert abs(summary["test_correct"] - one_host["test_correct"]) <= (0 if same_threads else 5), (summary, one_host)


@pytest.mark.slow
def test_partition_of_host_b_ends_both_sides_with_a_report(hosts, small_mnist, cli):
    """Host B cut off after the first checkpoint: host A's rank names rank 1 as missing, host B's rank
    says it lost the store and its peers; both exit 4 within --dist-timeout + 60 s. (Host B's torchrun
    agent itself stays blocked in its own store call to host A: torch's, see docs/launching.md.)"""
    env = child_env(PYTHONPATH=str(REPO), MNIST_DIST_FAULT="delay,point=step,rank=0,seconds=0.05")  # still training
    procs = launch(hosts, small_mnist, "--dist-timeout", str(TIMEOUT), "--epochs", "3", "--batch-size", "64",
                   "--checkpoint-every", "10", *QUIET, env=env)
    rank_b = first_checkpoint(hosts, procs)
    hosts.partition("host-b")
    cut, ended = time.monotonic(), {}
    while len(ended) < 2 and time.monotonic() - cut < TIMEOUT + 90:
        if "a" not in ended and procs["host-a"].poll() is not None:
            ended["a"] = time.monotonic() - cut
        if "b" not in ended and exited(rank_b) is not None:
            ended["b"], code_b = time.monotonic() - cut, exited(rank_b)
        time.sleep(0.2)
    logs = {n: log_of(hosts, n) for n in procs}
    assert len(ended) == 2, f"still running {TIMEOUT + 90} s after the cut: {ended}\n{logs}"
    assert max(ended.values()) < TIMEOUT + 60, (ended, logs)
    assert "[rank 0] error: missing: rank 1; a collective failed on rank 0" in logs["host-a"], logs["host-a"]
    assert "exitcode  : 4" in logs["host-a"], logs["host-a"]  # torchrun's summary of rank 0
    assert code_b in (4, -1), code_b  # -1: reaped by its agent before the code was read
    assert "[rank 1] error: lost the store and every peer: rank 1 cannot reach the launcher's store" in logs["host-b"]
    assert "this host (host-b) is cut off" in logs["host-b"], logs["host-b"]
    failure_a = [e for e in read_json(hosts.private("host-a") / "run/debug/rank-0.json")["events"]
                 if e["kind"] == "failure"][-1]
    failure_b = [e for e in read_json(hosts.private("host-b") / "run/debug/rank-1.json")["events"]
                 if e["kind"] == "failure"][-1]
    assert failure_a["missing"] == [1] and failure_a["lost_store"] is None, failure_a
    assert failure_b["missing"] == [] and failure_b["lost_store"] > 0, failure_b
    doctor_a = ok(cli("doctor", "--run-dir", hosts.private("host-a") / "run")).stdout
    doctor_b = ok(cli("doctor", "--run-dir", hosts.private("host-b") / "run")).stdout
    assert "missing: rank 1" in doctor_a, doctor_a
    assert "lost the store and every peer" in doctor_b and "missing: none named" in doctor_b, doctor_b
    print(f"partition: host A's rank ended {ended['a']:.1f} s after the cut, host B's {ended['b']:.1f} s")


@pytest.mark.slow
def test_rank_stuck_in_its_own_code_on_a_cut_off_host_still_ends(hosts, small_mnist):
    """Rank 1 asleep in its own code (no collective's deadline reaches it) when host B is cut off: its
    watchdog thread sees the store silent for --dist-timeout and no progress for --dist-timeout + 30 s,
    prints why and ends the rank (exit 4) within --dist-timeout + 60 s; host A names rank 1."""
    timeout = 10
    fault = "delay,point=step,rank=0,seconds=0.05;delay,point=step,rank=1,step=12,seconds=900"
    procs = launch(hosts, small_mnist, "--dist-timeout", str(timeout), "--epochs", "3", "--batch-size", "64",
                   "--checkpoint-every", "10", *QUIET, env=child_env(PYTHONPATH=str(REPO), MNIST_DIST_FAULT=fault))
    rank_b = first_checkpoint(hosts, procs)
    time.sleep(1.5)  # rank 1 is asleep at step 12 (rank 0 waits for it in step 13's all_reduce)
    hosts.partition("host-b")
    cut = time.monotonic()
    while exited(rank_b) is None and time.monotonic() - cut < timeout + 90:
        time.sleep(0.2)
    ended, code, logs = time.monotonic() - cut, exited(rank_b), {n: log_of(hosts, n) for n in procs}
    assert code is not None and ended < timeout + 60, (ended, logs)
    assert code in (4, -1), code  # -1: reaped by its agent, before the code was read
    assert "[rank 1] error: lost the store and every peer: the launcher's store at host-a:" in logs["host-b"], logs
    assert "this rank ends now (exit code 4)" in logs["host-b"] and "mnist_dist/faults.py" in logs["host-b"], logs
    wait_all(hosts, {"host-a": procs["host-a"]}, timeout=60)
    assert "[rank 0] error: missing: rank 1;" in log_of(hosts, "host-a"), log_of(hosts, "host-a")
    print(f"stuck on a cut-off host: rank 1 ended {ended:.1f} s after the cut (--dist-timeout {timeout})")


@pytest.mark.slow
def test_elastic_job_survives_losing_rank_0s_host(hosts, small_mnist):
    """torchrun --nnodes=1:2 on both hosts, the rendezvous on host B, rank 0 on host A (c10d ranks the
    nodes by host name), private run directories: host B keeps a copy of every checkpoint. Host A dies
    (every process SIGKILLed) after step 20: host B's agent re-forms the job at world size 1, its rank
    resumes from its own copy of the newest checkpoint and finishes; summary.json records the restart
    and the steps lost."""
    flags = ("--epochs", "1", "--batch-size", "64", "--checkpoint-every", "10", "--resume", "auto", *QUIET)
    env = child_env(PYTHONPATH=str(REPO), MNIST_DIST_FAULT="delay,point=step,rank=0,seconds=0.05")
    elastic = ("--nnodes=1:2", "--max-restarts=3", f"--rdzv-endpoint={hosts.address['host-b']}:{RDZV_PORT}",
               "--rdzv-conf=join_timeout=120,last_call_timeout=5,close_timeout=10")
    procs = launch(hosts, small_mnist, *flags, env=env, torchrun=elastic, order=("host-b", "host-a"))
    copies = hosts.private("host-b") / "run" / "checkpoints"
    deadline = time.monotonic() + 180
    while not (copies / "step-00000020.pt").exists():  # host B's copy: rank 1 writes it
        assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline, \
            "\n".join(f"--- {n}:\n{log_of(hosts, n)[-3000:]}" for n in procs)
        time.sleep(0.1)
    assert not (hosts.private("host-b") / "run" / "config.json").exists(), "rank 0 is on host A"
    for pid in hosts.pids("host-a"):  # the host dies: its agent and its rank at once
        os.kill(pid, signal.SIGKILL)
    wait_all(hosts, {"host-b": procs["host-b"]}, timeout=240)
    log_b = log_of(hosts, "host-b")
    assert procs["host-b"].returncode == 0, log_b
    summary = read_json(hosts.private("host-b") / "run" / "summary.json")
    (restart,) = summary["restarts"]
    assert summary["world_sizes"] == [2, 1] and summary["epochs"] == 1, summary  # the epoch, whatever the steps
    assert restart["world_size"] == 1 and restart["resumed_at_step"] >= 20, restart
    assert restart["reached_step"] >= restart["resumed_at_step"], restart
    assert f"restart 1 of this job at world size 1: resumed at global step {restart['resumed_at_step']}" in log_b
    assert summary["test_accuracy"] > 0.9, summary


@pytest.mark.slow
def test_a_slow_link_is_reported_and_a_healed_stall_logged(hosts, small_mnist):
    """Host B's link capped at 400 Mbit/s from the start: the network check measures each host's link
    to rank 0 and warns of the low bandwidth (under 1 Gbit/s); host B cut off for 12 s mid-run, then
    healed (under --dist-timeout 40): the run goes on, and both ranks log how long they waited."""
    hosts.cap("host-b", "400mbit", "1mbit")
    env = child_env(PYTHONPATH=str(REPO), MNIST_DIST_FAULT="delay,point=step,rank=0,seconds=0.05")
    procs = launch(hosts, small_mnist, "--dist-timeout", "40", "--epochs", "1", "--batch-size", "64",
                   "--max-steps", "30", "--checkpoint-every", "10", *QUIET, env=env)
    first_checkpoint(hosts, procs)
    hosts.partition("host-b")
    time.sleep(12)
    hosts.heal("host-b")
    wait_all(hosts, procs, timeout=180)
    logs = {n: log_of(hosts, n) for n in procs}
    assert all(p.returncode == 0 for p in procs.values()), logs
    network = read_json(hosts.private("host-a") / "run" / "config.json")["network"]
    link_b = network["hosts"][1]
    assert network["hosts"][0]["host"] == "host-a" and network["hosts"][0]["rtt_ms"] is None, network
    assert link_b["host"] == "host-b" and link_b["ranks"] == [1] and 0 < link_b["rtt_ms"] < 50, network
    assert 0.02 < link_b["gbps"] < 0.05 * 1.2, network  # 400 Mbit/s = 0.05 GB/s
    warnings = [x for x in logs["host-a"].splitlines() if x.startswith("[rank 0] warning: ")]
    assert any("low network bandwidth: " in x and "Mbit/s to rank 0" in x for x in warnings), warnings
    assert not any("high network latency" in x for x in warnings), warnings
    for name, rank in (("host-a", 0), ("host-b", 1)):
        healed = [x for x in logs[name].splitlines() if x.startswith(f"[rank {rank}] warning: waited ")]
        assert healed and "then went on: a network stall that healed" in healed[0], logs[name]
        assert 10 <= float(healed[0].split("waited ")[1].split(" s")[0]) < 40, healed
    events = read_json(hosts.private("host-a") / "run" / "debug" / "rank-0.json")["events"]
    assert [e["kind"] for e in events] == ["healed-stall"] and 10 <= events[0]["seconds"] < 40, events


# ----------------------------------------------------------------------------- start-up address mistakes
@pytest.mark.slow
def test_hosts_whose_name_resolves_to_loopback_still_train_and_distance_is_warned(hosts, small_mnist):
    """Debian's ``127.0.1.1 <hostname>`` on both hosts: gloo would bind the ranks to loopback (the
    other host's connection refused). Each host's first rank sees it, sets GLOO_SOCKET_IFNAME to the
    interface the other hosts reach it through (eth0), says so in one notice, and the job trains. Every
    packet host B sends is held 10 ms (tests/netns_delay.py: NFQUEUE, this kernel has no netem): the
    network check measures host B's round trip to rank 0 and warns of the latency (from 5 ms)."""
    for name in hosts.names:
        hosts.name_resolves_to(name, "127.0.1.1")
    hosts.delay("host-b", 0.01)
    # by name: torchrun hosts its store where the endpoint matches the host's name (its address would not)
    procs = launch(hosts, small_mnist, "--max-steps", "10", "--epochs", "1", "--dist-timeout", "20", *QUIET,
                   endpoint="host-a")
    wait_all(hosts, procs, timeout=180)
    logs = {n: log_of(hosts, n) for n in procs}
    assert all(p.returncode == 0 for p in procs.values()), logs
    for name in hosts.names:
        assert (f"notice: {name}: its name {name} resolves to 127.0.1.1, a loopback address, which other hosts "
                f"cannot reach: gloo uses eth0 ({hosts.address[name]})") in logs[name], logs[name]
    network = read_json(hosts.private("host-a") / "run" / "config.json")["network"]
    assert [(r["interface"], r["address"], r["chosen_by"]) for r in network["ranks"]] == \
        [("eth0", hosts.address[n], "GLOO_SOCKET_IFNAME") for n in hosts.names], network
    link_b = network["hosts"][1]
    assert link_b["host"] == "host-b" and 10 <= link_b["rtt_ms"] < 100, link_b
    warnings = [x for x in logs["host-a"].splitlines() if "warning: high network latency:" in x]
    assert warnings and f"host-b {link_b['rtt_ms']:.3g} ms round trip" in warnings[0], logs["host-a"]


@pytest.mark.slow
def test_a_host_name_on_an_unreachable_interface_fails_in_one_line(hosts, small_mnist):
    """Host A's name resolves to a second NIC (10.99.0.1) host B has no route to: before any process
    group, every rank stops with the same one line naming host A, the address and the variable to
    set, well within --dist-timeout + 60 s (it was 5 x --dist-timeout and a gloo traceback)."""
    hosts.name_resolves_to("host-a", "10.99.0.1", second_nic=True)
    start = time.monotonic()
    procs = launch(hosts, small_mnist, "--dist-timeout", "20", *QUIET, endpoint="host-a")
    wait_all(hosts, procs, timeout=140)
    took, logs = time.monotonic() - start, {n: log_of(hosts, n) for n in procs}
    line = ("error: host-b cannot reach host-a at 10.99.0.1:")
    advice = "set GLOO_SOCKET_IFNAME=eth0 on host-a (an interface host-b has a route to)"
    for name in hosts.names:
        assert procs[name].returncode != 0, logs[name]
        errors = [x for x in logs[name].splitlines() if line in x]
        assert errors and advice in errors[0] and "Network is unreachable" in errors[0], logs[name]
        # the rank's one line (torchrun then prints its own summary with the error file's traceback)
        assert len([x for x in logs[name].splitlines() if x.startswith("[rank ") and " error: " in x]) == 1, logs[name]
    assert took < 20 + 60, took


def test_preflight_names_host_name_mistakes(hosts, small_mnist):
    """``python -m mnist_dist.preflight`` on each host, before any torchrun: the endpoint given as the
    address of a host whose name resolves to 127.0.1.1 (torchrun would serve its store nowhere), the
    same host named (a note: the job picks eth0 itself), a host whose name does not resolve."""
    env = child_env(PYTHONPATH=str(REPO))
    preflight = [sys.executable, "-m", "mnist_dist.preflight", "--nproc-per-node", "1", "--data-dir", str(small_mnist)]
    hosts.name_resolves_to("host-a", "127.0.1.1")
    by_address = hosts.run("host-a", [*preflight, f"--rdzv-endpoint={hosts.address['host-a']}:{RDZV_PORT}"], env=env)
    assert by_address.returncode == 2 and by_address.stderr.startswith(
        "error: preflight on host-a: rendezvous endpoint 10.77.0.1 is an address of this node, but torchrun will "
        "not serve its store here: it matches the endpoint against this node's name (host-a -> 127.0.1.1)"), by_address
    assert "(RDZV_HOST=host-a)" in by_address.stderr and len(by_address.stderr.splitlines()) == 1, by_address.stderr
    by_name = hosts.run("host-a", [*preflight, f"--rdzv-endpoint=host-a:{RDZV_PORT}"], env=env)
    assert by_name.returncode == 0, by_name
    assert ("name host-a: its name host-a resolves to 127.0.1.1, a loopback address: the job sets "
            "GLOO_SOCKET_IFNAME=eth0 itself; with NCCL set NCCL_SOCKET_IFNAME=eth0") in by_name.stdout, by_name
    hosts.name_resolves_to("host-b", None)
    nameless = hosts.run("host-b", [*preflight, f"--rdzv-endpoint=host-a:{RDZV_PORT}"],
                         env={**env, "SLURM_NODEID": "1"})
    assert nameless.returncode == 2 and nameless.stderr.strip() == (
        "error: preflight on host-b: this node's name host-b does not resolve, and torchrun's rendezvous needs it "
        "to: add '10.77.0.2 host-b' to /etc/hosts (eth0 (10.77.0.2))"), nameless


# ----------------------------------------------------------------------------- dumps from two threads
def test_two_threads_dumping_at_once_do_not_collide(tmp_path, monkeypatch):
    """The watchdog thread's stall dump and the main thread's failure dump may be written at the same
    moment (a partition makes both happen within a second): each goes through a temporary file of its
    own thread. With one fixed temporary name a thread's rename found the file gone and the watchdog
    thread died."""
    from mnist_dist.diagnostics import flight
    from mnist_dist.diagnostics.watchdog import Watchdog

    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "2000")  # the recorder on (it records nothing here)
    watchdog = Watchdog(SimpleNamespace(dist_timeout=20.0, out_dir=str(tmp_path)),
                        SimpleNamespace(rank=0, world_size=2, backend="gloo"))
    watchdog.debug_dir.mkdir(parents=True)
    errors: list[str] = []

    def dump(thread: int) -> None:
        try:
            for n in range(200):
                assert flight.dump(watchdog.debug_dir, 0) is not None
                watchdog._record({"kind": "stall", "thread": thread, "n": n})
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(exc))

    with open(watchdog.txt, "ab", buffering=0) as fh:
        watchdog.dumps.fh = fh
        threads = [threading.Thread(target=dump, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        watchdog.dumps.fh = None
    assert not errors, errors[:3]
    assert sorted(p.name for p in watchdog.debug_dir.iterdir()) == ["fr_trace_rank_0", "rank-0.json", "rank-0.txt"]
    assert read_json(watchdog.json)["events"], "a whole JSON document"


# host B's side of the store test: prints "ready", then (partitioned by the test after 1 s) what the calls
# did, then waits for the heal and prints when the store answers again
STORE_CLIENT = """
import json, os, sys, time
os.environ.update(MASTER_ADDR="host-a", MASTER_PORT="29500")
from mnist_dist.diagnostics.heartbeat import HeartbeatStore
store = HeartbeatStore.connect(1, timeout_s=10, call_timeout=2.0)
store.publish({"beat": 1})
assert store.read(2)[1]["beat"] == 1 and store.error is None, store.error
print("ready", flush=True)
time.sleep(1.5)  # the test partitions host B meanwhile
t = time.monotonic(); beats = store.read(2); first = time.monotonic() - t
t = time.monotonic(); store.publish({"beat": 2}); store.read(2); then = time.monotonic() - t
print(json.dumps({"first_seconds": first, "first_answered": beats[1] is not None, "then_seconds": then,
                  "lost_for": store.lost_for(), "error": store.error}), flush=True)
deadline = time.monotonic() + 90
while time.monotonic() < deadline:  # the test heals the network: the stuck call returns, the store answers
    store.error = None
    beat = store.read(2)[1]
    if beat is not None and store.error is None:
        store.publish({"beat": 2})
        beat = store.read(2)[1]
        break
    time.sleep(0.5)
print(json.dumps({"answered": store.lost_for() is None, "beat": beat and {"beat": beat["beat"]}}), flush=True)
"""
