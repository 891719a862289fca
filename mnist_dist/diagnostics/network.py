"""The start-up network check under a launcher (``network_check``: a checked barrier, then ``probe``).

After a barrier that names absent ranks, every rank runs one small all_reduce whose sum is checked
(and timed: the latency), then a short bandwidth probe (an all_reduce of 4 MiB on the CPU, 64 MiB on
CUDA, timed five times), and says which socket interface its backend talks through:
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` when set, else what gloo uses by default (the
address this host's name resolves to) or "chosen by NCCL". The result goes into ``config.json``
(``network``) and one log line. Bus bandwidth follows nccl-tests: ``algbw * 2 (n - 1) / n``.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any

from ..errors import RankFailure

REPEATS = 5


def _timed_all_reduce(tensor, repeats: int) -> list[float]:
    import torch
    import torch.distributed as dist

    cuda = tensor.device.type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(tensor.device)
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if cuda:
            torch.cuda.synchronize(tensor.device)
        times.append(time.perf_counter() - start)
    return times


def network_check(env: Any, timeout_s: float) -> dict[str, Any]:
    """Start-up check under a launcher: a checked barrier, one small all_reduce whose sum is verified,
    a short bandwidth probe and the socket interface."""
    from ..dist import checked_barrier

    checked_barrier(env, timeout_s)
    return probe(env.rank, env.world_size, env.device, env.backend or "gloo")


def probe(rank: int, world_size: int, device, backend: str) -> dict[str, Any]:
    """Collective (every rank): correctness, latency, bandwidth, interfaces. Rank 0's timings."""
    import torch
    import torch.distributed as dist

    small = torch.tensor([float(rank + 1)], dtype=torch.float64, device=device)
    _timed_all_reduce(small, 1)
    expected = world_size * (world_size + 1) / 2
    if float(small.item()) != expected:
        raise RankFailure(f"network check: a {backend} all_reduce of the ranks' numbers returned "
                          f"{float(small.item())}, expected {expected} (world size {world_size})")
    small.fill_(1.0)
    latency = statistics.median(_timed_all_reduce(small, REPEATS))
    nbytes = (64 if device.type == "cuda" else 4) * 2 ** 20
    big = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    _timed_all_reduce(big, 1)  # warm-up: buffers, connections
    seconds = statistics.median(_timed_all_reduce(big, REPEATS))
    algbw = nbytes / seconds
    interfaces: list[Any] = [None] * world_size
    dist.all_gather_object(interfaces, {"host": socket.gethostname(), "pid": os.getpid(), **interface(backend)})
    return {
        "backend": backend,
        "world_size": world_size,
        "all_reduce_ok": True,
        "latency_ms": latency * 1e3,
        "bandwidth_bytes": nbytes,
        "bandwidth_repeats": REPEATS,
        "bandwidth_ms": seconds * 1e3,
        "algbw_gbps": algbw / 1e9,
        "busbw_gbps": algbw * 2 * (world_size - 1) / world_size / 1e9,
        "ranks": interfaces,
    }


def _interface_addresses() -> dict[str, str]:
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


def interface(backend: str) -> dict[str, Any]:
    """The socket interface this rank's backend uses, and how it was chosen."""
    variable = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    value = os.environ.get(variable) or None
    addresses = _interface_addresses()
    if value:
        first = value.lstrip("=^").split(",")[0]
        return {"variable": variable, "value": value, "interface": value, "address": addresses.get(first),
                "chosen_by": variable}
    if backend == "nccl":
        return {"variable": variable, "value": None, "interface": None, "address": None,
                "chosen_by": "NCCL (NCCL_DEBUG=INFO prints its choice)"}
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = None
    name = next((n for n, a in addresses.items() if a == address), None)
    return {"variable": variable, "value": None, "interface": name, "address": address,
            "chosen_by": "gloo's default, the host name's address"}


def describe(result: dict[str, Any]) -> str:
    """One log line."""
    first = result["ranks"][0] or {}
    names = sorted({f"{r.get('interface') or '?'}" for r in result["ranks"] if r})
    hosts = len({r.get("host") for r in result["ranks"] if r})
    how = first.get("chosen_by", "?")
    return (f"network check: {result['backend']}, {result['world_size']} ranks on {hosts} host(s), interface "
            f"{'/'.join(names)} {first.get('address') or ''} (chosen by {how}; {first.get('variable')} "
            f"overrides); all_reduce ok, {result['latency_ms']:.2f} ms; "
            f"{result['bandwidth_bytes'] / 2 ** 20:.0f} MiB all_reduce {result['bandwidth_ms']:.1f} ms = "
            f"{result['busbw_gbps']:.2f} GB/s bus bandwidth (median of {result['bandwidth_repeats']}); rank pids "
            f"{' '.join(str(r.get('pid')) for r in result['ranks'])} (kill -USR2 PID: that rank's stacks into "
            f"<out-dir>/debug/)")
