"""What a network fault does to a run across hosts (a table, not a test). Root only.

    MNIST_DATA_DIR=../shared/data python benchmarks/hosts_matrix.py [--dist-timeout 20] [--only partition,loss] [--keep DIR]

Every row is real: two simulated hosts (``tests/netns_hosts.py``: network namespaces behind a bridge,
their own hostnames and private run directories), one rank each under torchrun with the c10d
rendezvous on host A's address, the small MNIST (the first 6,000 / 1,000 images of ``$MNIST_DATA_DIR``,
copied into each host's directory), one epoch of batch 64 (94 steps), a checkpoint every 10 steps.
The fault hits host B when host A's first checkpoint appears (step 10; in the "stuck" row 1.5 s later,
once rank 1 sleeps at step 12); rank 0 sleeps 0.05 s after each step (4.7 s in all, in every row), so
that the run is still training when it comes.

Columns: how each side ended (host A's torchrun, host B's rank, host B's torchrun agent: its exit code,
"ended" for a rank its agent reaped before its code was seen, or "blocked" when it was still running
``--agent-wait`` s after both ranks ended, then killed) and how many seconds after the fault (the
no-fault row: after the first checkpoint); the run's training seconds and test accuracy when it finished; and the
first line of each side's report. Prints a Markdown table (docs/launching.md, "Across hosts").

The scenarios (``SCENARIOS``, a second table): two or three hosts, elastic jobs (``--nnodes=1:2``,
``--resume auto``) where a host is killed or partitioned, the rendezvous store on a training host or on
one that trains not, host names on loopback or on an unreachable second NIC; with each host's torchrun
exit, the world sizes, the step the survivor resumed at and the steps lost (``summary.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from netns_hosts import Hosts, unavailable  # noqa: E402

SLOW = "delay,point=step,rank=0,seconds=0.05"
STUCK = "delay,point=step,rank=1,step=12,seconds=900"  # rank 1 stuck in its own code (no deadline reaches it)
STUCK_AFTER = 1.5  # s after the first checkpoint: rank 1 is asleep at step 12 when its host is cut off
# name: (what happens to host B at the first checkpoint, $MNIST_DIST_FAULT, tcp_retries2 on every host)
ROWS = {
    "none": ("no fault", SLOW, None),
    "partition": ("partition of host B", SLOW, None),
    "partition-retries2": ("partition of host B, net.ipv4.tcp_retries2=8 on both hosts", SLOW, "8"),
    "cut-heal": ("host B cut off for 5 s, then healed", SLOW, None),
    "loss": ("10% of host B's packets dropped (each way)", SLOW, None),
    "cap": ("host B's link capped at 10 Mbit/s (tc tbf, each way)", SLOW, None),
    "delay": ("host B's packets held 50 ms (NFQUEUE shaper: +50 ms round trip)", SLOW, None),
    "stuck-partition": ("rank 1 stuck in its own code (asleep at step 12), host B partitioned", f"{SLOW};{STUCK}",
                        None),
    "partition-a": ("partition of host A (the store's host)", SLOW, None),
}


def exit_status(pid: int) -> int | None:
    """A child's exit code while it is a zombie (its launcher has not reaped it), -1 once gone, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[-1]) >> 8 if fields[0] == "Z" else None


def launch(hosts: Hosts, data: Path, timeout: float, fault: str) -> dict[str, subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MNIST_DIST_ALLOW_SUBSET="1",
               PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    if fault:
        env["MNIST_DIST_FAULT"] = fault
    procs = {}
    for name in hosts.names:
        shutil.copytree(data, hosts.private(name) / "data")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={hosts.address['host-a']}:29400", "--rdzv-id=matrix", str(REPO / "train_ddp.py"),
               "--data-dir", str(hosts.mount_point / "data"), "--out-dir", str(hosts.mount_point / "run"),
               "--dist-timeout", str(timeout), "--epochs", "1", "--batch-size", "64", "--checkpoint-every", "10",
               "--threads", "1", "--no-progress", "--no-plots", "--no-export"]
        with open(hosts.root / f"{name}.log", "w") as log:
            procs[name] = hosts.popen(name, cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return procs


def apply(hosts: Hosts, row: str) -> None:
    if row in ("partition", "partition-retries2", "stuck-partition", "cut-heal"):
        hosts.partition("host-b")
    elif row == "partition-a":
        hosts.partition("host-a")
    elif row == "loss":
        hosts.loss("host-b", 0.10)
    elif row == "cap":
        hosts.cap("host-b", "10mbit", "64kbit")
    elif row == "delay":
        hosts.delay("host-b", 0.05)


def first_error(log: str) -> str:
    """The gist of a side's report: its first error line up to the first ';' (or ': ')."""
    lines = [line.split("error: ", 1)[1] for line in log.splitlines() if "] error: " in line]
    if not lines:
        return ""
    gist = lines[0].split(";")[0]
    gist = gist.split(": ")[0] if len(gist) > 40 else gist
    return gist + (" (ended by its watchdog thread)" if "this rank ends now (exit code 4)" in log else "")


def run_row(root: Path, data: Path, row: str, timeout: float, agent_wait: float) -> dict:
    what, fault, retries2 = ROWS[row]
    folder = root / row
    while folder.exists():  # a row asked for twice
        folder = folder.with_name(folder.name + "+")
    with Hosts(folder, ["host-a", "host-b"]) as hosts:
        if retries2:
            for name in hosts.names:
                hosts.sysctl(name, "net.ipv4.tcp_retries2", retries2)
        procs = launch(hosts, data, timeout, fault)
        checkpoints = hosts.private("host-a") / "run" / "checkpoints"
        started = time.monotonic()
        while not list(checkpoints.glob("step-*.pt")) and time.monotonic() - started < 300:
            if any(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.1)
        kids = subprocess.run(["pgrep", "-P", str(procs["host-b"].pid)], capture_output=True, text=True).stdout.split()
        rank_b = int(kids[0]) if kids else -1
        if row == "stuck-partition":
            time.sleep(STUCK_AFTER)
        fault_at = time.monotonic()
        apply(hosts, row)
        ends: dict[str, tuple[int | str, float]] = {}
        limit, heal_at = fault_at + timeout + 600, 5.0 if row == "cut-heal" else None
        while time.monotonic() < limit:
            now = time.monotonic() - fault_at
            if heal_at is not None and now >= heal_at:
                hosts.heal("host-b")
                heal_at = None
            if "a" not in ends and procs["host-a"].poll() is not None:
                ends["a"] = (procs["host-a"].returncode, now)
            if "rank b" not in ends and rank_b > 0 and exit_status(rank_b) is not None:
                ends["rank b"] = (exit_status(rank_b), now)
            if "b" not in ends and procs["host-b"].poll() is not None:
                ends["b"] = (procs["host-b"].returncode, now)
                ends.setdefault("rank b", ("reaped", now))
            ranks_done = "a" in ends and "rank b" in ends
            if len(ends) == 3 or (ranks_done and now > max(v[1] for v in ends.values()) + agent_wait):
                break
            time.sleep(0.2)
        for key in ("a", "rank b", "b"):
            ends.setdefault(key, ("blocked", time.monotonic() - fault_at))
        summary_path = hosts.private("host-a") / "run" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        logs = {name: (hosts.root / f"{name}.log").read_text(errors="replace") for name in hosts.names}
    return {"row": row, "what": what, "ends": ends, "accuracy": summary.get("test_accuracy"),
            "train_seconds": summary.get("train_seconds"), "report_a": first_error(logs["host-a"]),
            "report_b": first_error(logs["host-b"])}


# ----------------------------------------------------------------------------- elastic, 3 hosts, addresses
# name: (what, hosts, where the rendezvous store is ("agent:<host>" or "standalone:<host>"), the fault, its
# host, torchrun's --nnodes). Faults: kill (every process of the host SIGKILLed), partition, loopback-names
# (every host's /etc/hosts: 127.0.1.1 <own name>), second-nic (the host's name on an interface nobody reaches).
SCENARIOS = {
    "three-hosts": ("3 hosts, no fault", ("host-a", "host-b", "host-c"), "agent:host-a", "", "", "3"),
    "three-partition-c": ("3 hosts, host C partitioned", ("host-a", "host-b", "host-c"), "agent:host-a",
                          "partition", "host-c", "3"),
    "elastic-kill-a": ("elastic 1:2, host A (rank 0) killed; store on host B", ("host-a", "host-b"),
                       "agent:host-b", "kill", "host-a", "1:2"),
    "elastic-partition-a": ("elastic 1:2, host A (rank 0) partitioned; store on host B", ("host-a", "host-b"),
                            "agent:host-b", "partition", "host-a", "1:2"),
    "elastic-kill-b": ("elastic 1:2, host B (the store's) killed", ("host-a", "host-b"), "agent:host-b", "kill",
                       "host-b", "1:2"),
    "standalone-kill-a": ("elastic 1:2, store on host S (trains not), host A (rank 0) killed",
                          ("host-a", "host-b", "host-s"), "standalone:host-s", "kill", "host-a", "1:2"),
    "standalone-kill-b": ("elastic 1:2, store on host S (trains not), host B killed",
                          ("host-a", "host-b", "host-s"), "standalone:host-s", "kill", "host-b", "1:2"),
    "loopback-names": ("every host's name on 127.0.1.1 (Debian's /etc/hosts)", ("host-a", "host-b"),
                       "agent:host-a", "loopback-names", "", "2"),
    "second-nic": ("host A's name on a second NIC host B cannot reach", ("host-a", "host-b"), "agent:host-a",
                   "second-nic", "host-a", "2"),
}
STORE = ("import time, torch.distributed as d\ns = d.TCPStore('0.0.0.0', 29400, is_master=True, "
         "wait_for_workers=False)\ntime.sleep(10 ** 6)")


def run_scenario(root: Path, data: Path, name: str, timeout: float) -> dict:
    """One scenario: torchrun on every training host (the store's host named by name, as torchrun
    recognises its own), the fault at the first checkpoint anywhere (or at the start), then until
    every torchrun ended (at most ``timeout`` + 240 s)."""
    what, names, store, fault, target, nnodes = SCENARIOS[name]
    kind, store_host = store.split(":")
    trainers = [h for h in names if h != "host-s"]
    with Hosts(root / name, list(names)) as hosts:
        if fault == "loopback-names":
            for host in trainers:
                hosts.name_resolves_to(host, "127.0.1.1")
        elif fault == "second-nic":
            hosts.name_resolves_to(target, "10.99.0.1", second_nic=True)
        if kind == "standalone":
            hosts.popen(store_host, [sys.executable, "-c", STORE])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MNIST_DIST_ALLOW_SUBSET="1",
                   PYTHONUNBUFFERED="1", WANDB_MODE="offline", MNIST_DIST_FAULT=SLOW)
        procs, started = {}, time.monotonic()
        for host in sorted(trainers, key=lambda h: h != store_host):  # the store's agent first
            shutil.copytree(data, hosts.private(host) / "data")
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
                   "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint={store_host}:29400",
                   "--rdzv-id=matrix", "--rdzv-conf=join_timeout=120,last_call_timeout=5,close_timeout=10",
                   str(REPO / "train_ddp.py"), "--data-dir", str(hosts.mount_point / "data"), "--out-dir",
                   str(hosts.mount_point / "run"), "--dist-timeout", str(timeout), "--epochs", "1", "--batch-size",
                   "96", "--checkpoint-every", "10", "--threads", "1", "--resume", "auto", "--no-progress",
                   "--no-plots", "--no-export"]
            with open(hosts.root / f"{host}.log", "w") as log:
                procs[host] = hosts.popen(host, cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if fault in ("kill", "partition"):
            while time.monotonic() - started < 300 and all(p.poll() is None for p in procs.values()):
                if any(list(hosts.private(h).glob("run/checkpoints/step-*.pt")) for h in trainers):
                    break
                time.sleep(0.1)
            if fault == "kill":
                for pid in hosts.pids(target):
                    os.kill(pid, 9)
            else:
                hosts.partition(target)
        fault_at, ends = time.monotonic(), {}
        while time.monotonic() - fault_at < timeout + 240 and len(ends) < len(procs):
            for host, proc in procs.items():
                if host not in ends and proc.poll() is not None:
                    ends[host] = (proc.returncode, time.monotonic() - fault_at)
            time.sleep(0.2)
        for host in procs:
            ends.setdefault(host, ("blocked", time.monotonic() - fault_at))
        summaries = [json.loads(f.read_text()) for h in trainers for f in hosts.private(h).glob("run/summary.json")]
        logs = {h: (hosts.root / f"{h}.log").read_text(errors="replace") for h in trainers}
    summary = summaries[0] if summaries else {}
    restart = (summary.get("restarts") or [{}])[-1]
    return {"row": name, "what": what, "ends": ends, "accuracy": summary.get("test_accuracy"),
            "world_sizes": summary.get("world_sizes"), "resumed_at": restart.get("resumed_at_step"),
            "lost": restart.get("lost_steps"), "reports": {h: first_error(logs[h]) for h in trainers}}


def scenario_table(results: list[dict], timeout: float) -> str:
    return markdown([f"scenario (--dist-timeout {timeout:g})", "each host's torchrun", "world sizes",
                     "resumed at step (steps lost)", "test acc", "the first error line of each host"], {4}, [
        [r["what"], "; ".join(f"{h[-1].upper()}: {cell(e)}" for h, e in r["ends"].items()), r["world_sizes"],
         f"{r['resumed_at']} ({r['lost']})" if r["resumed_at"] is not None else None, percent(r["accuracy"]),
         "; ".join(f"{h[-1].upper()}: {t}" for h, t in r["reports"].items() if t)] for r in results])


# ----------------------------------------------------------------------------- SLURM across the namespaces
SLURM_ROWS = {
    "slurm": "slurm/train.sbatch, 2 nodes = hosts A and B, no fault",
    "slurm-partition": "slurm/train.sbatch, 2 nodes = hosts A and B, host B partitioned",
}


def netns_slurm(hosts: Hosts, root: Path):
    """tests/slurm_cluster.py's cluster with its daemons on the simulated hosts: slurmctld on host
    "ctl", node1's slurmd on host A, node2's on host B (munged and the shared filesystem as they are)."""
    from slurm_cluster import SlurmCluster

    class NetnsSlurm(SlurmCluster):
        where = {"slurmctld": "ctl", "node1": "host-a", "node2": "host-b"}

        def _spawn(self, name: str, args: list[str], user: str | None = None) -> None:
            if name in self.where:  # the host's network, name and /etc/hosts, but this machine's /sys (slurmd
                host = self.where[name]  # needs its cgroups; `ip netns exec` would mount a sysfs of its own)
                ns = hosts.ns(host)
                args = ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation", "private",
                        "sh", "-c", 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"', "sh",
                        host, f"/etc/netns/{ns}/hosts", *args]
            super()._spawn(name, args, user)

        def _write_config(self) -> None:
            super()._write_config()
            text = self.conf.read_text().splitlines()
            lines = [line for line in text if not line.startswith(("SlurmctldHost=", "SlurmctldPort=", "NodeName="))]
            lines += [f"SlurmctldHost=ctl({hosts.address['ctl']})", "SlurmctldPort=6817",
                      *(f"NodeName=node{i} NodeHostname=host-{c} NodeAddr={hosts.address['host-' + c]} Port=6818 "
                        f"CPUs={self.cpus} State=UNKNOWN" for i, c in ((1, "a"), (2, "b")))]
            self.conf.write_text("\n".join(lines) + "\n")

        def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
            proc = subprocess.run(hosts.command("ctl", list(args)), capture_output=True, text=True, timeout=timeout,
                                  env=self.env(), stdin=subprocess.DEVNULL)
            if check and proc.returncode != 0:
                raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
            return proc

    return NetnsSlurm(root, nodes=2, cpus=2)


def run_slurm(root: Path, data: Path, row: str, timeout: float) -> dict:
    """One SLURM row: the job submitted from host "ctl" (its run directory on the shared filesystem),
    host B partitioned at the first checkpoint for "slurm-partition"; the job's state and exit code, when
    it ended, and the first error line of each node in the job's log."""
    import tempfile as tmp

    folder = Path(tmp.mkdtemp(prefix=f"{row}-", dir=root))
    for path in (root, folder):  # not 0700: munged (its own user) walks them to its socket
        os.chmod(path, 0o755)
    with Hosts(folder / "hosts", ["ctl", "host-a", "host-b"]) as hosts:
        with netns_slurm(hosts, folder / "slurm") as cluster:
            runs, log = folder / "runs", folder / "job.out"
            env = cluster.env({k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
                              PYTHON=sys.executable, RUNS_DIR=str(runs), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                              MNIST_DIST_ALLOW_SUBSET="1", WANDB_MODE="offline", MNIST_DIST_FAULT=SLOW)
            submit = subprocess.run(hosts.command("ctl", [
                "sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--output={log}",
                str(REPO / "slurm" / "train.sbatch"), "--data-dir", str(data), "--dist-timeout", str(timeout),
                "--epochs", "1", "--batch-size", "64", "--checkpoint-every", "10", "--no-progress", "--no-plots",
                "--no-export"]), capture_output=True, text=True, env=env, timeout=60)
            job = submit.stdout.strip().split(";")[0]
            started, fault_at, info, ran = time.monotonic(), None, {}, False
            while time.monotonic() - started < timeout + 400:
                info = cluster.job_info(job)
                ran = ran or info.get("JobState") == "RUNNING"
                if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                    break
                if ran and info.get("JobState") in ("PENDING", "REQUEUED"):  # SLURM requeued it (a node failed)
                    info["JobState"] = f"requeued by SLURM ({info.get('Reason', '?')})"
                    break
                if fault_at is None and list(runs.glob("*/checkpoints/step-*.pt")):
                    fault_at = time.monotonic()
                    if row == "slurm-partition":
                        hosts.partition("host-b")
                time.sleep(0.5)
            ended = time.monotonic() - (fault_at or started)
            text = log.read_text(errors="replace") if log.is_file() else submit.stderr
            summaries = [json.loads(f.read_text()) for f in runs.glob("*/summary.json")]
            configs = [json.loads(f.read_text()) for f in runs.glob("*/config.json")]
    errors = [line for line in text.splitlines() if "error: " in line]
    return {"row": row, "what": SLURM_ROWS[row], "state": info.get("JobState", "?"), "exit": info.get("ExitCode"),
            "seconds": ended, "accuracy": summaries[0]["test_accuracy"] if summaries else None,
            "hosts": ", ".join(configs[0].get("hostnames") or []) if configs else None,
            "errors": [first_error(e) or e.split("error: ", 1)[1][:120] for e in errors[:2]]}


def slurm_table(results: list[dict], timeout: float) -> str:
    return markdown([f"SLURM (--dist-timeout {timeout:g})", "job state, exit code",
                     "s after the fault (the first checkpoint)", "hosts", "test acc", "the first error lines"], {2, 4}, [
        [r["what"], f"{r['state']}, {r['exit']}", f"{r['seconds']:.0f}", r["hosts"], percent(r["accuracy"]),
         "; ".join(r["errors"])] for r in results])


# ----------------------------------------------------------------------------- Ray across the namespaces
RAY_ROWS = {
    "ray": "python -m mnist_dist ray, 2 workers on hosts A and B, no fault",
    "ray-partition": "python -m mnist_dist ray, 2 workers on hosts A and B, host B partitioned",
}


def run_ray(root: Path, data: Path, row: str, timeout: float) -> dict:
    """One Ray row: a Ray head on host A and a node on host B (one CPU each, so one worker on each), the
    driver on host A (``--max-failures 0``), the run directory and Ray's storage on the shared
    filesystem; host B partitioned at the first checkpoint for "ray-partition"."""
    import tempfile as tmp

    folder = Path(tmp.mkdtemp(prefix=f"{row}-", dir=root))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", MNIST_DIST_ALLOW_SUBSET="1",
               WANDB_MODE="offline", PYTHONUNBUFFERED="1", MNIST_DIST_FAULT=SLOW)
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1", "--num-gpus=0",
           "--disable-usage-stats"]
    with Hosts(folder / "hosts", ["host-a", "host-b"]) as hosts:
        for name, extra in (("host-a", ["--head", "--port=6379", "--include-dashboard=false"]),
                            ("host-b", [f"--address={hosts.address['host-a']}:6379"])):
            temp = Path(tmp.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a limit
            with open(folder / f"ray-{name}.log", "w") as log:
                hosts.popen(name, [*ray, f"--node-ip-address={hosts.address[name]}", f"--temp-dir={temp}", *extra],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 120
            while "Ray runtime started" not in (folder / f"ray-{name}.log").read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
        run = folder / "run"
        with open(folder / "driver.log", "w") as log:
            driver = hosts.popen("host-a", [
                sys.executable, "-m", "mnist_dist", "ray", "--num-workers", "2", "--address",
                f"{hosts.address['host-a']}:6379", "--storage", str(folder / "storage"), "--data-dir", str(data),
                "--out-dir", str(run), "--dist-timeout", str(timeout), "--epochs", "1", "--batch-size", "64",
                "--checkpoint-every", "10", "--threads", "1", "--no-progress", "--no-plots", "--no-export"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while not list(run.glob("checkpoints/step-*.pt")) and driver.poll() is None and time.monotonic() - started < 300:
            time.sleep(0.1)
        fault_at = time.monotonic()
        if row == "ray-partition":
            hosts.partition("host-b")
        try:
            driver.wait(timeout=timeout + 300)
            code: int | str = driver.returncode
        except subprocess.TimeoutExpired:
            code = "blocked"
        seconds = time.monotonic() - fault_at
        text = (folder / "driver.log").read_text(errors="replace")
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    errors = [line.split("error: ", 1)[1] for line in text.splitlines() if line.startswith("error: ")]
    return {"row": row, "what": RAY_ROWS[row], "code": code, "seconds": seconds,
            "hosts": ", ".join(config.get("hostnames") or []), "accuracy": summary.get("test_accuracy"),
            "error": errors[0][:200] if errors else ""}


def ray_table(results: list[dict], timeout: float) -> str:
    return markdown([f"Ray (--dist-timeout {timeout:g})", "driver", "s after the fault (the first checkpoint)", "hosts",
                     "test acc", "the driver's error line"], {2, 4}, [
        [r["what"], f"exit {r['code']}", f"{r['seconds']:.0f}", r["hosts"], percent(r["accuracy"]), r["error"]]
        for r in results])


def markdown(header: list[str], right: set[int], rows: list[list]) -> str:
    """A Markdown table: the header, columns ``right``-aligned by index, ``None`` or "" shown as "—"."""
    rule = "|".join("---:" if i in right else "---" for i in range(len(header)))
    cells = [[("—" if c in (None, "") else str(c)) for c in row] for row in rows]
    return "\n".join([f"| {' | '.join(header)} |", f"|{rule}|", *(f"| {' | '.join(row)} |" for row in cells)])


def percent(x: float | None) -> str | None:
    return f"{x:.2%}" if x is not None else None


def cell(end: tuple) -> str:
    code, seconds = end
    if code == "blocked":
        return f"blocked > {seconds:.0f} s"
    return f"{'ended' if code in (-1, 'reaped') else f'exit {code}'} ({seconds:.0f} s)"  # -1: reaped, code unseen


def table(results: list[dict], timeout: float) -> str:
    return markdown([f"fault (--dist-timeout {timeout:g})", "host A torchrun", "host B rank", "host B torchrun",
                     "training s", "test acc", "host A says", "host B says"], {4, 5}, [
        [r["what"], cell(r["ends"]["a"]), cell(r["ends"]["rank b"]), cell(r["ends"]["b"]),
         f"{r['train_seconds']:.1f}" if r["train_seconds"] is not None else None, percent(r["accuracy"]),
         r["report_a"], r["report_b"]] for r in results])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist-timeout", type=float, default=20.0)
    parser.add_argument("--only", default="", help=f"comma-separated rows of: {', '.join([*ROWS, *SCENARIOS, *SLURM_ROWS, *RAY_ROWS])}")
    parser.add_argument("--agent-wait", type=float, default=60.0,
                        help="seconds to wait for host B's torchrun after both ranks ended (the retries2 row: 180)")
    parser.add_argument("--keep", default="", help="keep every row's hosts' files and logs under this directory")
    args = parser.parse_args()
    why = unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    from conftest import make_small_mnist, real_mnist_root

    real = real_mnist_root()
    if real is None:
        print("error: set MNIST_DATA_DIR to a directory holding MNIST/raw", file=sys.stderr)
        return 2
    rows = [r for r in args.only.split(",") if r] or list(ROWS)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hosts-matrix-"))
    try:
        data = make_small_mnist(root / "small", real)
        results, scenarios, slurm, ray = [], [], [], []
        for row in rows:
            if row in RAY_ROWS:
                ray.append(run_ray(root, data, row, args.dist_timeout))
                print(f"{row}: {ray[-1]['code']} {ray[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
                continue
            if row in SLURM_ROWS:
                slurm.append(run_slurm(root, data, row, args.dist_timeout))
                print(f"{row}: {slurm[-1]['state']} {slurm[-1]['exit']}", file=sys.stderr, flush=True)
                continue
            if row in SCENARIOS:
                scenarios.append(run_scenario(root, data, row, args.dist_timeout))
                print(f"{row}: {scenarios[-1]['ends']}", file=sys.stderr, flush=True)
                continue
            wait = max(args.agent_wait, 180.0) if row == "partition-retries2" else args.agent_wait
            results.append(run_row(root, data, row, args.dist_timeout, wait))
            print(f"{row}: {results[-1]['ends']}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{datetime.date.today()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}")
    if results:
        print(table(results, args.dist_timeout))
    if scenarios:
        print(scenario_table(scenarios, args.dist_timeout))
    if slurm:
        print(slurm_table(slurm, args.dist_timeout))
    if ray:
        print(ray_table(ray, args.dist_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
