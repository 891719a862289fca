"""Simulated hosts on one machine: network namespaces behind a bridge, for tests/test_hosts.py and
benchmarks/hosts_matrix.py (root only; docs/testing.md, "Simulated hosts").

    with Hosts(tmp_path, ["host-a", "host-b"]) as hosts:
        a = hosts.popen("host-a", [sys.executable, "-m", "torch.distributed.run", ...])
        hosts.partition("host-b")          # real packets dropped, both directions
        hosts.heal("host-b")

Each host is a network namespace ``<tag>-<name>`` with one interface ``eth0`` (10.77.<subnet>.<i+1>/24)
whose other end is a port of the bridge ``br0`` in a namespace of its own (``<tag>-sw``: the host's
FORWARD policy, which dockerd sets to DROP, never sees the frames). A process started with ``popen``
runs in its host's namespace with the host's name (``unshare --uts``), ``/etc/hosts`` naming every
host (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``), and the host's
private directory ``<root>/private/<name>`` bind-mounted at the same path ``<root>/mnt`` on every
host (``unshare --mount``): a run directory that is not shared, as on separate machines.

Faults are real packets dropped or held: ``partition``/``heal`` (iptables DROP on the receivers: in
the host's namespace for what it receives, in every other host's for what it sends, so that no sender
sees a local error), ``loss`` (the same with ``-m statistic --mode random``), ``cap`` (``tc tbf`` on
both ends of the host's link), ``delay`` (this kernel has no ``netem``: the host's outgoing packets go
to NFQUEUE and ``netns_delay.py`` holds each for the delay). ``close`` (and leaving the ``with``) kills
every process left in the namespaces, by pid, and deletes them.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

TOOLS = ("ip", "iptables", "tc", "unshare", "mount", "hostname")
_ENTER = 'hostname "$1" && mount --bind "$2" "$3" || exit 97; shift 3; exec "$@"'


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why the harness cannot run here (None: it can): root, the tools, a namespace with iptables."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces, iptables, mounts)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"simulated hosts need {', '.join(missing)} (apt-get install iproute2 iptables; .ci/run does)"
    probe = f"mdprobe-{secrets.token_hex(3)}"
    try:
        if _sh("ip", "netns", "add", probe, check=False).returncode != 0:
            return "`ip netns add` fails here (no network namespaces)"
        rule = _sh("ip", "netns", "exec", probe, "iptables", "-w", "-A", "INPUT", "-m", "statistic", "--mode",
                   "random", "--probability", "0.5", "-j", "DROP", check=False)
        if rule.returncode != 0:
            return f"iptables does not work inside a network namespace: {rule.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return None


class Hosts:
    """N hosts behind one switch; a context manager that cleans up also when a test fails."""

    def __init__(self, root: Path, names: list[str] | tuple[str, ...] = ("host-a", "host-b"), subnet: int = 0) -> None:
        self.root, self.names = Path(root), list(names)
        self.tag = f"md{secrets.token_hex(3)}"  # unique: parallel workers never share a namespace
        self.switch = f"{self.tag}-sw"
        self.address = {name: f"10.77.{subnet}.{i + 1}" for i, name in enumerate(self.names)}
        self.mount_point = self.root / "mnt"  # the same path on every host, a different directory behind it
        self.procs: list[subprocess.Popen] = []
        self.rules: list[tuple[str, list[str]]] = []  # (namespace, rule) added by the faults
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def private(self, name: str) -> Path:
        """What ``name`` sees at ``mount_point``, seen from outside."""
        return self.root / "private" / name

    def __enter__(self) -> "Hosts":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.mount_point.mkdir(parents=True, exist_ok=True)
        self._netns(self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.address.items())
        for i, name in enumerate(self.names):
            ns, port = self.ns(name), f"{self.tag}p{i}"
            self._netns(ns)
            _sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            self.private(name).mkdir(parents=True, exist_ok=True)

    def _netns(self, ns: str) -> None:
        _sh("ip", "netns", "add", ns)
        self.made.append(ns)

    def name_resolves_to(self, name: str, address: str | None, second_nic: bool = False) -> None:
        """Host ``name``'s own /etc/hosts maps its name to ``address`` (the other hosts' still say its real
        one): Debian's ``127.0.1.1 <hostname>``, or with ``second_nic`` the address of an interface
        ``nic1`` added to it that no other host can reach (a second NIC); None: to nothing."""
        ns = self.ns(name)
        if second_nic:
            _sh("ip", "-n", ns, "link", "add", "nic1", "type", "veth", "peer", "name", "nic1p")
            _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "nic1")
            for link in ("nic1", "nic1p"):
                _sh("ip", "-n", ns, "link", "set", link, "up")
        etc = Path("/etc/netns") / ns / "hosts"
        lines = [line for line in etc.read_text().splitlines() if not line.endswith(f" {name}")]
        etc.write_text("\n".join([*lines, *([f"{address} {name}"] if address else [])]) + "\n")

    # ------------------------------------------------------------------ processes
    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` as run on host ``name`` (its namespace, hostname and private directory)."""
        return ["ip", "netns", "exec", self.ns(name), "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", _ENTER, "sh", name, str(self.private(name)), str(self.mount_point), *argv]

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process on host ``name`` (its own session: ``close`` kills its group)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(name, argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], timeout: float = 60, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env)

    def pids(self, name: str) -> list[int]:
        """Every process in host ``name``'s network namespace."""
        out = _sh("ip", "netns", "pids", self.ns(name), check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    # ------------------------------------------------------------------ faults
    def _rule(self, ns: str, rule: list[str]) -> None:
        _sh("ip", "netns", "exec", ns, "iptables", "-w", "-I", "INPUT", *rule)
        self.rules.append((ns, rule))

    def _drop(self, name: str, extra: list[str]) -> None:
        """Drop (``extra``: a share of) what ``name`` receives and what it sends, at the receivers."""
        self._rule(self.ns(name), ["-i", "eth0", *extra, "-j", "DROP"])
        for other in self.names:
            if other != name:
                self._rule(self.ns(other), ["-s", self.address[name], *extra, "-j", "DROP"])

    def partition(self, name: str) -> None:
        """Cut ``name`` off from every other host: every packet to or from it is dropped."""
        self._drop(name, [])

    def loss(self, name: str, share: float) -> None:
        """Drop ``share`` (0..1) of the packets to and from ``name``, at random."""
        self._drop(name, ["-m", "statistic", "--mode", "random", "--probability", f"{share:.4f}"])

    def heal(self, name: str | None = None) -> None:
        """Remove the partitions and losses that concern ``name`` (None: all)."""
        keep = []
        for ns, rule in self.rules:
            if name is None or ns == self.ns(name) or (self.address[name] in rule):
                _sh("ip", "netns", "exec", ns, "iptables", "-w", "-D", "INPUT", *rule, check=False)
            else:
                keep.append((ns, rule))
        self.rules = keep

    def delay(self, name: str, seconds: float) -> None:
        """Hold every packet host ``name`` sends for ``seconds`` (tests/netns_delay.py: NFQUEUE and a
        user-space shaper, this kernel having no netem): its round trip to every host grows by that."""
        ns = self.ns(name)
        shaper = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).with_name(
            "netns_delay.py")), str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, stdin=subprocess.DEVNULL)
        self.procs.append(shaper)
        line = shaper.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the delay shaper did not start: {line}{shaper.stderr.read()}")
        rule = ["-o", "eth0", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"]
        _sh("ip", "netns", "exec", ns, "iptables", "-w", "-I", "OUTPUT", *rule)

    def cap(self, name: str, rate: str = "1mbit", burst: str = "32kbit", latency: str = "400ms") -> None:
        """Limit ``name``'s link to ``rate`` each way (tc tbf on both ends of its veth)."""
        port = f"{self.tag}p{self.names.index(name)}"
        for ns, dev in ((self.ns(name), "eth0"), (self.switch, port)):
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                "burst", burst, "latency", latency)

    def uncap(self, name: str) -> None:
        port = f"{self.tag}p{self.names.index(name)}"
        for ns, dev in ((self.ns(name), "eth0"), (self.switch, port)):
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    def sysctl(self, name: str, key: str, value: str) -> None:
        """A per-namespace kernel setting on host ``name`` (e.g. net.ipv4.tcp_retries2)."""
        _sh("ip", "netns", "exec", self.ns(name), "sysctl", "-qw", f"{key}={value}")

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Kill what runs in the namespaces (by pid), delete them and their /etc/netns files."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.made:
            out = _sh("ip", "netns", "pids", ns, check=False).stdout
            for pid in (int(p) for p in out.split() if p.isdigit()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.made):
            _sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.made.clear()
