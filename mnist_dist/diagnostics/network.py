"""The start-up network check under a launcher (``network_check``: a checked barrier, then ``probe``).

After a barrier that names absent ranks, every rank runs one small all_reduce whose sum is checked
(and timed: the latency), then a short bandwidth probe (an all_reduce of 4 MiB on the CPU, 64 MiB on
CUDA, smaller on a slow link, timed five times; none at one rank), measures each host's link to rank 0's host (round trip and
bandwidth, ``host_links``), and says which socket interface its backend talks through:
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` when set, else what gloo uses by default (the
address this host's name resolves to) or "chosen by NCCL". The result goes into ``config.json``
(``network``) and one log line, plus a warning for high latency or low bandwidth (``warnings_of``).
Bus bandwidth follows nccl-tests: ``algbw * 2 (n - 1) / n``.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any

from ..addresses import interface_addresses
from ..errors import RankFailure

REPEATS = 5
PROBE_TARGET_S = 0.25  # the bandwidth probe stops growing once one all_reduce takes this long
HIGH_LATENCY_MS = 5.0  # a one-number all_reduce or a round trip this slow is warned about (a LAN: < 1 ms)
LOW_BANDWIDTH_GBPS = 0.125  # 1 Gbit/s: below it the gradients' all_reduce dominates a step


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
    """Collective (every rank): correctness, latency, bandwidth (none at one rank: nothing crosses a
    wire), each host's round trip and bandwidth to rank 0's, interfaces. Rank 0's timings."""
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
    nbytes, seconds = bandwidth(device) if world_size > 1 else (64 * 2 ** 10, None)
    ranks: list[Any] = [None] * world_size
    dist.all_gather_object(ranks, {"host": socket.gethostname(), "pid": os.getpid(), **interface(backend)})
    algbw = nbytes / seconds if seconds else None
    return {
        "backend": backend,
        "world_size": world_size,
        "all_reduce_ok": True,
        "latency_ms": latency * 1e3,
        "bandwidth_bytes": nbytes if seconds else None,
        "bandwidth_repeats": REPEATS if seconds else None,
        "bandwidth_ms": seconds * 1e3 if seconds else None,
        "algbw_gbps": algbw / 1e9 if algbw else None,
        "busbw_gbps": algbw * 2 * (world_size - 1) / world_size / 1e9 if algbw else None,
        "hosts": host_links(rank, ranks, device, nbytes),
        "ranks": ranks,
    }


def bandwidth(device) -> tuple[int, float]:
    """(bytes, median seconds of ``REPEATS`` all_reduces of that many): the size grows 4x from 64 KiB to
    4 MiB (64 MiB on CUDA) while one all_reduce takes under ``PROBE_TARGET_S`` on every rank, so that
    a distant link costs seconds, not minutes (gloo's ring waits a round trip per chunk: 4 MiB took
    22 s at a 30 ms delay). The first all_reduce of each size is the warm-up (buffers, connections)."""
    import torch
    import torch.distributed as dist

    largest, nbytes = (64 if device.type == "cuda" else 4) * 2 ** 20, 64 * 2 ** 10
    while True:
        big = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        took = torch.tensor(_timed_all_reduce(big, 1), dtype=torch.float64, device=device)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)  # one decision for all ranks
        if float(took.item()) >= PROBE_TARGET_S or nbytes >= largest:
            return nbytes, statistics.median(_timed_all_reduce(big, REPEATS))
        nbytes *= 4


def host_links(rank: int, ranks: list[dict[str, Any]], device, nbytes: int) -> list[dict[str, Any]]:
    """Every host with its ranks; for each host but rank 0's, the round trip (median of ``REPEATS``
    ping-pongs of one number) and the bandwidth (``nbytes`` sent to rank 0, median of 3) between its
    first rank and rank 0 — one host at a time, the other ranks idle (a collective)."""
    import torch
    import torch.distributed as dist

    hosts: dict[str, list[int]] = {}
    for r, info in enumerate(ranks):
        hosts.setdefault(info["host"], []).append(r)
    out = []
    for host, members in hosts.items():
        link: dict[str, Any] = {"host": host, "ranks": members, "rtt_ms": None, "gbps": None}
        peer = members[0]
        if peer != 0 and rank in (0, peer):
            other = peer if rank == 0 else 0
            one, big = torch.zeros(1, device=device), torch.zeros(nbytes // 4, device=device)
            trips, sends = [], []
            for _ in range(REPEATS + 1):  # the first: warm-up
                start = time.perf_counter()
                if rank == 0:
                    dist.send(one, other), dist.recv(one, other)
                else:
                    dist.recv(one, other), dist.send(one, other)
                trips.append(time.perf_counter() - start)
            for _ in range(3):
                start = time.perf_counter()
                dist.recv(big, other) if rank == 0 else dist.send(big, other)
                sends.append(time.perf_counter() - start)
            link.update(rtt_ms=statistics.median(trips[1:]) * 1e3, gbps=nbytes / statistics.median(sends) / 1e9)
        out.append(link)
    return out


def warnings_of(result: dict[str, Any]) -> list[str]:
    """What is slow enough to say: latency from ``HIGH_LATENCY_MS``, bandwidth under ``LOW_BANDWIDTH_GBPS``."""
    found = []
    slow = [h for h in result["hosts"] if (h["rtt_ms"] or 0) >= HIGH_LATENCY_MS]
    if result["latency_ms"] >= HIGH_LATENCY_MS or slow:
        where = ", ".join(f"{h['host']} {h['rtt_ms']:.3g} ms round trip" for h in slow) or "between the ranks"
        found.append(f"high network latency: an all_reduce of one number takes {result['latency_ms']:.3g} ms "
                     f"({where}; a LAN answers in well under {HIGH_LATENCY_MS:g} ms): every step waits for it")
    thin = [h for h in result["hosts"] if h["gbps"] is not None and h["gbps"] < LOW_BANDWIDTH_GBPS]
    if (result["busbw_gbps"] is not None and result["busbw_gbps"] < LOW_BANDWIDTH_GBPS) or thin:
        where = ", ".join(f"{h['host']} {h['gbps'] * 8e3:.3g} Mbit/s to rank 0" for h in thin) or "between the ranks"
        found.append(f"low network bandwidth: {result['busbw_gbps'] or 0:.3g} GB/s bus bandwidth ({where}; under "
                     f"{LOW_BANDWIDTH_GBPS * 8:g} Gbit/s): the gradients' all_reduce will dominate the step")
    return found


def interface(backend: str) -> dict[str, Any]:
    """The socket interface this rank's backend uses, and how it was chosen."""
    variable = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    value = os.environ.get(variable) or None
    addresses = interface_addresses()
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
    """One log line: the backend, the interface, latency and bandwidth (3 significant digits), then
    each host with its ranks' pids and its link to rank 0's host."""
    first = result["ranks"][0] or {}
    names = sorted({f"{r.get('interface') or '?'}" for r in result["ranks"] if r})
    how = first.get("chosen_by", "?")
    size = result.get("bandwidth_bytes") or 0
    size_text = f"{size / 2 ** 20:.0f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.0f} KiB"
    bandwidth = (f"{size_text} all_reduce {result['bandwidth_ms']:.3g} ms = "
                 f"{result['busbw_gbps']:.3g} GB/s bus bandwidth (median of {result['bandwidth_repeats']})"
                 if result.get("busbw_gbps") is not None else "no bandwidth at one rank")
    hosts = []
    for link in result.get("hosts", []):
        pids = ",".join(str(result["ranks"][r].get("pid")) for r in link["ranks"])
        ranks = ",".join(map(str, link["ranks"]))
        to_zero = (f", {link['rtt_ms']:.3g} ms round trip and {link['gbps']:.3g} GB/s to rank 0"
                   if link.get("rtt_ms") is not None else "")
        hosts.append(f"{link['host']} (rank {ranks}, pid {pids}{to_zero})")
    return (f"network check: {result['backend']}, {result['world_size']} rank(s) on {len(hosts)} host(s), interface "
            f"{'/'.join(names)} {first.get('address') or ''} (chosen by {how}; {first.get('variable')} "
            f"overrides); all_reduce ok, {result['latency_ms']:.3g} ms; {bandwidth}; {'; '.join(hosts)} "
            f"(kill -USR2 PID: that rank's stacks into <out-dir>/debug/)")
