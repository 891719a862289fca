"""Checks a launcher runs on every node before any rank starts, so a bad job fails fast, not hangs.

    python -m mnist_dist.preflight --nproc-per-node 4 --gpus-per-node 4 --data-dir DIR \\
        --rdzv-endpoint 10.0.0.1:23456 --nnodes 2

Checks on this node: torch imports; the allocated GPUs are visible to torch and cover the processes
per node; the MNIST files are present and intact (a data dir that is not on a shared filesystem
shows up here). The rendezvous: on the first node of the job (``SLURM_NODEID`` 0) the rendezvous
address must be one of this node's own addresses and the port free; with more than one node, the
first node then listens on that port until every other node has connected to it, so an address
another node cannot reach (a management network, a firewall) fails here instead of hanging in
torchrun's rendezvous. Prints one ``preflight ok`` line, or one ``error:`` line per node and exits 2.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
from typing import Sequence

from .errors import UserError

ACK = b"ok\n"


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def check_torch() -> str:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install raising something else
        raise UserError(
            f"torch does not import with {sys.executable} on this node ({type(exc).__name__}: {exc}); "
            f"load the environment on every node (SETUP='source /path/venv/bin/activate' or "
            f"'module load ...', needed with sbatch --export=NONE) or set PYTHON"
        ) from None
    return f"torch {torch.__version__}"


def check_gpus(nproc_per_node: int, gpus_per_node: int) -> str:
    if gpus_per_node <= 0:
        return "cpu"
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < nproc_per_node:
        raise UserError(
            f"{gpus_per_node} GPU(s) allocated and {nproc_per_node} process(es) per node, but torch sees "
            f"{visible} CUDA device(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}); check the driver / container "
            f"(--nv) or set NPROC_PER_NODE"
        )
    return f"{visible} GPU(s)"


def check_data(data_dir: str) -> str:
    from .data import mnist as data

    missing = data.missing_files(data_dir)
    if missing:
        raise UserError(
            f"MNIST files missing in {data.raw_dir(data_dir)} ({', '.join(missing)}); the data dir must be "
            f"on a filesystem every node sees (download once: python -m mnist_dist download --data-dir DIR)"
        )
    data.validate_files(data_dir)
    return f"data ok in {data.raw_dir(data_dir)}"


def parse_endpoint(endpoint: str) -> tuple[str, int, list[tuple]]:
    host, _, port_text = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"rendezvous endpoint {endpoint!r} is not HOST:PORT") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"rendezvous host {host!r} does not resolve on this node: {exc}") from None
    return host, port, infos


def check_own_address(host: str, infos: list[tuple]) -> None:
    """The address must be this node's: torchrun's store is hosted here, and others connect to it."""
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((sockaddr[0], 0))  # only an address assigned to one of this node's interfaces binds
        except OSError as exc:
            shown = host if host == sockaddr[0] else f"{host} ({sockaddr[0]})"
            raise UserError(
                f"rendezvous address {shown} is not an address of the first node "
                f"({exc.strerror}); set RDZV_HOST to an address of {node_name()} that every node can reach"
            ) from None


def check_store_host(host: str) -> None:
    """torchrun's c10d rendezvous serves its store on the node whose name or name's addresses match the
    endpoint (torch's ``_matches_machine_hostname``), not on the node that merely has the address; an
    endpoint no agent recognises leaves every node waiting for a store nobody serves."""
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    except ImportError:  # a torch without it: nothing to compare with
        return
    if not _matches_machine_hostname(host):
        name = socket.gethostname()
        raise UserError(f"rendezvous endpoint {host} is an address of this node, but torchrun will not serve its "
                        f"store here: it matches the endpoint against this node's name ({name} -> "
                        f"{', '.join(resolved(name)) or 'nothing'}), so every node would wait for a store nobody "
                        f"serves; name the endpoint by this node's name (RDZV_HOST={name}), or fix {name}'s line in "
                        f"/etc/hosts")


def resolved(name: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)})
    except socket.gaierror:
        return []


def check_host_name(endpoint_host: str) -> str:
    """This node's name as gloo and torchrun use it: an error if it does not resolve (torchrun's
    rendezvous fails on it), a note when it resolves to loopback (the job then sets
    GLOO_SOCKET_IFNAME itself; NCCL needs NCCL_SOCKET_IFNAME)."""
    from .addresses import hostname_address, is_loopback, outward_interface

    name = socket.gethostname()
    address, problem = hostname_address()
    interface, outward = outward_interface(endpoint_host)
    route = f"{interface} ({outward})" if interface else "the interface the other nodes reach"
    if not resolved(name):
        raise UserError(f"this node's name {name} does not resolve, and torchrun's rendezvous needs it to: add "
                        f"'{outward or 'ADDRESS'} {name}' to /etc/hosts ({route})")
    if problem and (endpoint_host == "localhost" or is_loopback(endpoint_host)):
        return f"name {name} -> {address} (loopback: fine for a job on this machine only)"
    if problem:
        return (f"name {name}: {problem}: the job sets GLOO_SOCKET_IFNAME={interface or '?'} itself; with NCCL "
                f"set NCCL_SOCKET_IFNAME={interface or '<interface>'}")
    return f"name {name} -> {address}"


def listen_on(port: int, family: int) -> socket.socket:
    """Bind the rendezvous port on all addresses, as the c10d store will (TIME_WAIT is fine)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("::" if family == socket.AF_INET6 else "", port))
    except OSError as exc:
        s.close()
        raise UserError(f"rendezvous port {port} is already in use on the first node ({exc.strerror}); "
                        f"set RDZV_PORT to a free port") from None
    return s


def read_line(conn: socket.socket, limit: int = 256) -> bytes:
    """Bytes up to a newline (or the peer closing): TCP may deliver a short message in pieces."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.strip()


def host_rendezvous(endpoint: str, nnodes: int, timeout: float, token: str = "", rdzv_conf: str = "") -> str:
    """First node: own address, free port, and (nnodes > 1) wait until every other node connected.

    Peers say ``TOKEN NODE``; connections without this job's token (another job on the same port, a
    port scanner, a stale client) are answered with nothing and not counted."""
    host, port, infos = parse_endpoint(endpoint)
    check_own_address(host, infos)
    if not re.search(r"(^|,)is_host=(1|true|yes)\b", rdzv_conf.lower()):  # set: torchrun serves it here anyway
        check_store_host(host)
    with listen_on(port, infos[0][0]) as server:
        if nnodes <= 1:
            return f"rendezvous {host}:{port} is this node's, port free"
        server.listen(nnodes)
        reached: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(reached) < nnodes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(
                    f"only {len(reached)} of the {nnodes - 1} other node(s) reached the rendezvous "
                    f"{host}:{port} within {timeout:.0f} s ({', '.join(sorted(reached)) or 'none'}); set RDZV_HOST to "
                    f"an address of this node on a network every node reaches, and let TCP port {port} through"
                )
            server.settimeout(left)
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    said, _, name = read_line(conn).decode(errors="replace").partition(" ")
                    if said != (token or "-") or not name:
                        continue
                    conn.sendall(ACK)
                    conn.recv(1)  # the peer closes first, so no TIME_WAIT is left on the port here
                except OSError:
                    continue
                reached.add(name)
    return f"rendezvous {host}:{port} is this node's, reached by {', '.join(sorted(reached))}"


def reach_rendezvous(endpoint: str, timeout: float, token: str = "") -> str:
    """Other nodes: connect to the first node's rendezvous address (it listens during its preflight)."""
    host, port, infos = parse_endpoint(endpoint)
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while time.monotonic() < deadline:
        family, _, _, _, sockaddr = infos[0]
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(min(5.0, max(0.1, deadline - time.monotonic())))
                s.connect(sockaddr)
                s.sendall(f"{token or '-'} {node_name()}\n".encode())
                if read_line(s) + b"\n" == ACK:
                    return f"rendezvous {host}:{port} reached"
                reason = "no answer to this job's token (another job or service on that port?)"
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        time.sleep(0.2)
    raise UserError(
        f"cannot reach the rendezvous {host}:{port} on the first node within {timeout:.0f} s (last: {reason}); "
        f"set RDZV_HOST to an address of the first node that every node can reach, and let TCP port "
        f"{port} through"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_dist.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs allocated per node (0 = CPU)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the first node (SLURM_NODEID 0)")
    parser.add_argument("--nnodes", type=int, default=int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1),
                        help="nodes that must reach the rendezvous (default: $SLURM_JOB_NUM_NODES or 1)")
    parser.add_argument("--reach-timeout", type=float, default=120.0,
                        help="seconds to wait for the nodes to reach each other's rendezvous check")
    parser.add_argument("--rdzv-conf", default=os.environ.get("PET_RDZV_CONF", ""),
                        help="torchrun's --rdzv-conf on the first node (is_host=1: its agent serves the store "
                        "whatever its name resolves to)")
    parser.add_argument("--token", default="", help="the same word on every node of this job (e.g. the "
                        "job id and its start): the first node counts only peers that say it")
    args = parser.parse_args(argv)
    name = node_name()
    try:
        if args.nproc_per_node < 1:
            raise UserError(f"processes per node must be >= 1, got {args.nproc_per_node}")
        found = [check_torch(), check_gpus(args.nproc_per_node, args.gpus_per_node), check_data(args.data_dir)]
        if args.rdzv_endpoint:
            found.append(check_host_name(parse_endpoint(args.rdzv_endpoint)[0]))
            if os.environ.get("SLURM_NODEID", "0") == "0":
                found.append(host_rendezvous(args.rdzv_endpoint, args.nnodes, args.reach_timeout, args.token,
                                             args.rdzv_conf))
            else:
                found.append(reach_rendezvous(args.rdzv_endpoint, args.reach_timeout, args.token))
    except UserError as exc:
        print(f"error: preflight on {name}: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"preflight ok on {name}: {args.nproc_per_node} process(es), " + ", ".join(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
