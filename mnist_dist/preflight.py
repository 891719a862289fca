"""Checks a launcher runs on every node before any rank starts, so a bad job fails fast, not hangs.

    python -m mnist_dist.preflight --nproc-per-node 4 --gpus-per-node 4 --data-dir DIR \\
        --rdzv-endpoint 10.0.0.1:23456

Checks on this node: the allocated GPUs are visible to torch and cover the processes per node; the
MNIST files are present and intact (a data dir that is not on a shared filesystem shows up here); on
the first node of the job (``SLURM_NODEID`` 0) the rendezvous address is one of its own and the port
is free. Prints one ``preflight ok`` line, or one ``error:`` line per node and exits 2.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Sequence

from .errors import UserError


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


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


def check_rendezvous(endpoint: str) -> str:
    """On the first node: the rendezvous port must be free there (the c10d store binds it)."""
    host, _, port_text = endpoint.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"rendezvous endpoint {endpoint!r} is not HOST:PORT") from None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"rendezvous host {host!r} does not resolve on this node: {exc}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the c10d store binds (TIME_WAIT is fine)
        try:
            s.bind(("", port))
        except OSError as exc:
            raise UserError(f"rendezvous port {port} is already in use on the first node ({exc.strerror}); "
                            f"set RDZV_PORT to a free port") from None
    return f"rendezvous {host}:{port} free"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_dist.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs allocated per node (0 = CPU)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rdzv-endpoint", default="", help="HOST:PORT, checked on SLURM_NODEID 0")
    args = parser.parse_args(argv)
    name = node_name()
    try:
        if args.nproc_per_node < 1:
            raise UserError(f"processes per node must be >= 1, got {args.nproc_per_node}")
        found = [check_gpus(args.nproc_per_node, args.gpus_per_node), check_data(args.data_dir)]
        if args.rdzv_endpoint and os.environ.get("SLURM_NODEID", "0") == "0":
            found.append(check_rendezvous(args.rdzv_endpoint))
    except UserError as exc:
        print(f"error: preflight on {name}: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"preflight ok on {name}: {args.nproc_per_node} process(es), " + ", ".join(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
