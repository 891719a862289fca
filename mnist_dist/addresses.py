"""The address each host's ranks talk through, settled and checked before the process group exists
(``dist.join_process_group``, for gloo across hosts under torchrun).

gloo binds every rank to the address its host's name resolves to (``GLOO_SOCKET_IFNAME`` unset) and
tells the other ranks to connect there. Three mistakes make that address useless to the other hosts,
and each used to cost 5 x ``--dist-timeout`` and end in a raw gloo traceback:

* the name resolves to a loopback address (Debian's ``127.0.1.1 <hostname>`` line in /etc/hosts), or
  does not resolve (gloo then falls back to loopback), or resolves to an address no interface of this
  host has: here the interface is **set** from the route to the rendezvous (``MASTER_ADDR``), which
  every host reaches by construction, and one notice says so;
* the name resolves to an interface the other hosts cannot reach (a second NIC, a management
  network): ``check_reach`` finds it. The first rank of every host listens on the address gloo will
  use and every such rank connects to every other one's, through the launcher's store, within
  ``--dist-timeout``; one that cannot makes every rank stop with the same one-line error, naming both
  hosts, the address and port, and the ``GLOO_SOCKET_IFNAME`` to set.

NCCL chooses its own interfaces (``NCCL_SOCKET_IFNAME``): nothing here applies to it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
from typing import Any

from .console import notice
from .errors import UserError

PROBE_CONNECT_S = 5.0  # one connection attempt from a host to another


def await_rendezvous(rank: int, timeout_s: float) -> tuple[str, int]:
    """MASTER_ADDR:MASTER_PORT, checked: a port, a name that resolves, a connection (but for env://'s rank 0, which
    makes the store), retried for ``timeout_s``; else one UserError, where torch logs each try with a C++ stack."""
    addr, raw = os.environ.get("MASTER_ADDR", "").strip(), os.environ.get("MASTER_PORT", "")
    port = int(raw) if raw.strip().isdigit() else -1
    if not addr or not 1 <= port <= 65535:
        bad = f"MASTER_PORT={raw!r} is not a TCP port (1-65535)" if addr else "MASTER_ADDR is empty"
        raise UserError(f"{bad}; set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port there, the "
                        f"same on every rank (MASTER_ADDR={addr!r})")
    connect = rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(addr, port)
            if connect:
                socket.create_connection((addr, port), min(5.0, max(0.1, deadline - time.monotonic()))).close()
            return addr, port
        except socket.gaierror as exc:
            problem = f"MASTER_ADDR does not resolve ({exc.strerror}); check its spelling and DNS"
        except OSError as exc:
            problem = (f"{exc.strerror or exc}; check that rank 0 is running, that every rank has the same "
                       f"MASTER_ADDR and MASTER_PORT, and that no firewall blocks the port")
        if time.monotonic() >= deadline:
            raise UserError(f"cannot reach the rendezvous at {addr}:{port} (MASTER_ADDR:MASTER_PORT) within "
                            f"--dist-timeout {timeout_s:g} s: {problem}")
        time.sleep(0.5)



def interface_addresses() -> dict[str, str]:
    """IPv4 address of each network interface (Linux ioctl SIOCGIFADDR); {} elsewhere."""
    try:
        import fcntl
        import struct
    except ImportError:
        return {}
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                out[name] = socket.inet_ntoa(packed[20:24])
            except OSError:
                continue
    return out


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def hostname_address() -> tuple[str | None, str | None]:
    """(what gloo binds to by default, why it is no use to other hosts or None): the first address this
    host's name resolves to that binds, as gloo picks it."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None, f"its name {name} does not resolve (gloo falls back to the loopback address)"
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((sockaddr[0], 0))
            except OSError:
                continue
        if is_loopback(sockaddr[0]):
            return sockaddr[0], f"its name {name} resolves to {sockaddr[0]}, a loopback address"
        return sockaddr[0], None
    return None, f"no address its name {name} resolves to is this host's (gloo falls back to loopback)"


def route_to(host: str) -> tuple[str | None, str | None]:
    """(interface, address) this host reaches ``host`` through (the kernel's route; no packet sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            source = s.getsockname()[0]
    except OSError:
        return None, None
    return next((n for n, a in interface_addresses().items() if a == source), None), source


def outward_interface(master: str) -> tuple[str | None, str | None]:
    """(interface, address) other hosts can reach this one through: the route to the rendezvous; where
    that is loopback (this host is the rendezvous' and its name resolves to loopback) the default
    route's; else the only interface that is not loopback, if there is one."""
    for target in (master, "192.0.2.1"):  # 192.0.2.1: TEST-NET, never answered; only the route is looked up
        interface, address = route_to(target)
        if interface is not None and address is not None and not is_loopback(address):
            return interface, address
    others = [(n, a) for n, a in interface_addresses().items() if not is_loopback(a)]
    return others[0] if len(others) == 1 else (None, None)


def gloo_address() -> tuple[str | None, str]:
    """(the address gloo will bind this host's ranks to, how it was chosen)."""
    chosen = os.environ.get("GLOO_SOCKET_IFNAME")
    if chosen:
        first = chosen.split(",")[0]
        return interface_addresses().get(first), f"GLOO_SOCKET_IFNAME={chosen}"
    address, _ = hostname_address()
    return address, f"{socket.gethostname()}'s address in /etc/hosts or DNS"


def settle_interface(master: str) -> None:
    """Set ``GLOO_SOCKET_IFNAME`` to the interface other hosts reach this one through when the host
    name's address is of no use to them (see the module docstring); one notice per host."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    _, problem = hostname_address()
    if problem is None:
        return
    interface, address = outward_interface(master)
    if interface is None:
        return  # no interface but loopback (one machine), or several: check_reach says what to set
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    if os.environ.get("LOCAL_RANK", "0") == "0":
        notice(f"{socket.gethostname()}: {problem}, which other hosts cannot reach: gloo uses {interface} "
               f"({address}), the interface other hosts reach this one through (set GLOO_SOCKET_IFNAME to "
               f"choose another)")


def _accept_until(server: socket.socket, done: threading.Event) -> None:
    server.settimeout(0.2)
    while not done.is_set():
        try:
            conn, _ = server.accept()
        except OSError:
            continue
        conn.close()


def _wait(store: Any, keys: list[str], deadline: float, what: str) -> None:
    import datetime

    left = max(1.0, deadline - time.monotonic())
    try:
        store.wait(keys, datetime.timedelta(seconds=left))
    except Exception as exc:  # noqa: BLE001 - torch's DistStoreError / RuntimeError: a host that never came
        missing = [k.rsplit("/", 1)[1] for k in keys if not store.check([k])]
        raise UserError(f"the address check before the process group: host(s) {', '.join(missing)} (torchrun's "
                        f"GROUP_RANK) never {what} within {left:.0f} s ({type(exc).__name__})") from None


def check_reach(store: Any, timeout_s: float, master: str) -> None:
    """Every host's first rank reaches every other host's on the address gloo will use there (a
    collective over the store, before the process group); else the same one-line UserError on every rank."""
    hosts, group = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1), os.environ.get("GROUP_RANK", "0")
    if hosts <= 1:
        return
    deadline, leader = time.monotonic() + timeout_s, os.environ.get("LOCAL_RANK", "0") == "0"
    keys = {kind: [f"reach/{kind}/{g}" for g in range(hosts)] for kind in ("host", "address", "result")}
    if leader:
        store.set(f"reach/host/{group}", socket.gethostname())
    _wait(store, keys["host"], deadline, "said its name")
    if len({store.get(k) for k in keys["host"]}) == 1:
        return  # every agent on one machine: any address does
    settle_interface(master)
    if leader:
        address, how = gloo_address()
        interface, _ = outward_interface(master)
        me = {"host": socket.gethostname(), "address": address, "how": how, "route": interface, "port": None,
              "interfaces": {n: a for n, a in interface_addresses().items() if not is_loopback(a)}}
        server, done = None, threading.Event()
        if address is not None:
            server = socket.create_server((address, 0), family=socket.AF_INET6 if ":" in address else socket.AF_INET)
            me["port"] = server.getsockname()[1]
            threading.Thread(target=_accept_until, args=(server, done), daemon=True).start()
        try:
            store.set(f"reach/address/{group}", json.dumps(me))
            _wait(store, keys["address"], deadline, "said which address it listens on")
            peers = {g: json.loads(store.get(k)) for g, k in enumerate(keys["address"]) if str(g) != group}
            failures = [unreachable(me, peer) for peer in peers.values()]
            store.set(f"reach/result/{group}", json.dumps([f for f in failures if f]))
            _wait(store, keys["result"], deadline, "finished the address check")
        finally:
            done.set()
            if server is not None:
                server.close()
    else:
        _wait(store, keys["result"], deadline, "finished the address check")
    failures = [f for k in keys["result"] for f in json.loads(store.get(k))]
    if failures:
        raise UserError(failures[0])


def unreachable(me: dict[str, Any], peer: dict[str, Any]) -> str | None:
    """None if ``me`` connects to ``peer``'s gloo address, else the one line that says what to fix: the
    interface of ``peer`` this host has a route to (else its interface to the rendezvous)."""
    routed = [n for n, a in (peer.get("interfaces") or {}).items() if a != peer.get("address") and route_to(a)[0]]
    better = routed[0] if routed else peer.get("route")
    fix = (f"set GLOO_SOCKET_IFNAME={better} on {peer['host']} (an interface {me['host']} has a route to)"
           if better else f"set GLOO_SOCKET_IFNAME on {peer['host']}")
    if peer.get("address") is None or peer.get("port") is None:
        return f"{peer['host']} has no address gloo can use ({peer['how']}); {fix}, or fix its name in /etc/hosts"
    try:
        socket.create_connection((peer["address"], peer["port"]), timeout=PROBE_CONNECT_S).close()
        return None
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
    return (f"{me['host']} cannot reach {peer['host']} at {peer['address']}:{peer['port']}, the address gloo uses "
            f"there (from {peer['how']}): {why}; {fix}, or make {peer['host']}'s name resolve to an address the "
            f"other hosts reach")
