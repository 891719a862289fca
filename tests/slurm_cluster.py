"""A real SLURM cluster on localhost for tests: munged, slurmctld and N slurmd (node1..nodeN).

Everything lives in one temporary directory (config, munge key, state, spool, logs); the daemons run
in the foreground as child processes of the test and are stopped by PID (``stop()``, also on
failure). Needs Debian's ``slurm-wlm`` and ``munge`` (Slurm 22.05 was used to write this) and root.

    with SlurmCluster(tmp_path, nodes=2) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env())
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")


def missing_binaries() -> list[str]:
    """Names of the SLURM/munge programs that are not installed (empty when all are)."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=search) is None]


def _which(name: str) -> str:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    path = shutil.which(name, path=search)
    if path is None:
        raise RuntimeError(f"{name} not found; install slurm-wlm and munge")
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """First of ``count`` consecutive free TCP ports below the ephemeral range (slurmd wants a range)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(16000, 29000)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found")


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2, gpus_per_node: int = 0,
                 cred_expire: int = 10) -> None:
        self.root = Path(root)
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.gpus_per_node = gpus_per_node
        self.cred_expire = cred_expire  # also how long a requeued job waits before it starts again
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ environment for clients
    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key in [k for k in env if k.startswith("SLURM_") or k.startswith("SBATCH_")]:
            env.pop(key)  # never inherit an outer job's settings
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        env.update(extra)
        return env

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the local SLURM cluster needs root (slurmd starts jobs as their user)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_munged()
        self._write_config()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            self._spawn(node, [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self.wait_idle(timeout)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop every daemon we started, by PID (SIGTERM, then SIGKILL)."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self._cancel_all_jobs()
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            log = getattr(proc, "_log_handle", None)
            if log:
                log.close()
        self.procs.clear()

    def _cancel_all_jobs(self, timeout: float = 30.0) -> None:
        """Jobs outlive slurmd (their slurmstepd keeps running): cancel them and let them finish."""
        try:
            self.run("scancel", "--full", "--partition=debug", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
                states = self.node_states().values()
                if not queue and not any(s.startswith("comp") for s in states):
                    return
                time.sleep(0.5)
        except (subprocess.SubprocessError, RuntimeError, OSError):
            pass  # best effort: the daemons are stopped next either way

    def _spawn(self, name: str, args: list[str], user: str | None = None) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                user=user, env=self.env(), start_new_session=True)
        proc._log_handle = log  # type: ignore[attr-defined]
        self.procs[name] = proc

    def _start_munged(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(munge_dir, 0o755)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(key, 0o400)
        os.chmod(self.root, 0o755)  # munged walks the key's directories
        self._spawn("munged", [
            _which("munged"), "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ], user="munge")
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("munged did not start:\n" + self.logs())
            time.sleep(0.1)

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port = free_port_block(1)
        node_port = free_port_block(len(self.nodes))
        while node_port <= ctld_port < node_port + len(self.nodes):
            node_port = free_port_block(len(self.nodes))
        r = self.root
        gres = ""
        if self.gpus_per_node:
            # fake GPUs: gres.conf File= entries must be character devices; symlinks to /dev/null do
            dev = r / "dev"
            dev.mkdir(exist_ok=True)
            for i in range(self.gpus_per_node):
                link = dev / f"fakegpu{i}"
                if not link.exists():
                    link.symlink_to("/dev/null")
            (r / "gres.conf").write_text(
                f"Name=gpu File={dev}/fakegpu[0-{self.gpus_per_node - 1}]\n")
            gres = f" Gres=gpu:{self.gpus_per_node}"
        last = len(self.nodes)
        # MinJobAge=4 keeps `sbatch --wait` polling every 2 s (it polls less often when jobs are kept longer)
        self.conf.write_text(f"""\
ClusterName=mnisttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
EnforcePartLimits=ALL
KillWait=10
MinJobAge=4
SlurmdTimeout=60
{"GresTypes=gpu" if self.gpus_per_node else ""}
NodeName=node[1-{last}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_port}-{node_port + last - 1}] CPUs={self.cpus} State=UNKNOWN{gres}
PartitionName=debug Nodes=node[1-{last}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        (r / "state").mkdir(exist_ok=True)

    # ------------------------------------------------------------------ queries
    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self.env(),
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            states = self.node_states()
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout}s: {self.node_states()}\n{self.logs()}")

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        info: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")) + \
                sorted((self.root / "munge").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)
