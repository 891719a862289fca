"""The lines of a failure report (``watchdog.py`` writes them, ``entry.guarded`` prints them).

Two kinds: the surviving side of a failure names the missing ranks and where every rank was, from
their heartbeats (``peer_lines``); a rank whose launcher store does not answer either is on the cut-off
side of a partition (or the store's host is down) and says so instead (``cut_off_lines``): from there
every peer looks missing, and naming them would blame the wrong host.
"""

from __future__ import annotations

import re
from typing import Any

_BARRIER_NAMES = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


def position_text(pos: dict[str, Any]) -> str:
    if "epoch" not in pos:
        return "start-up"
    return f"epoch {pos['epoch']} step {pos['step']} (global step {pos['global_step']})"


def barrier_names(exc: BaseException) -> set[int]:
    """The ranks a gloo monitored barrier named in its error."""
    named = _BARRIER_NAMES.search(str(exc))
    return {int(r) for r in named.group(1).replace(" ", "").split(",") if r} if named else set()


def peer_lines(peers: dict[int, Any], status: dict[int, str], barrier: set[int], stale: float) -> list[str]:
    """One line per other rank: its status and its last heartbeat."""
    lines = []
    for rank in sorted(status):
        beat = peers.get(rank) or {}
        who = f"rank {rank}" + (f" (pid {beat['pid']} on {beat['host']})" if beat else "")
        if not beat:
            lines.append(f"{who}: {status[rank]}, no heartbeat ever seen")
            continue
        seen = f"{position_text(beat)}, in {beat.get('where')}"
        if status[rank] == "missing" and rank in barrier and beat["age"] <= stale:
            lines.append(f"{who}: MISSING from the barrier, yet alive (heartbeat {beat['age']:.1f} s ago): "
                         f"stuck at {seen}")
        elif status[rank] == "missing":
            lines.append(f"{who}: MISSING, last heartbeat {beat['age']:.1f} s ago at {seen}")
        else:
            lines.append(f"{who}: {status[rank]}, at {seen}")
    return lines


def cut_off_lines(rank: int, host: str, address: str, lost: float, failed: str, others: list[int]) -> list[str]:
    """The report of a rank that lost the store and its peers: ``failed`` says which collective failed."""
    return [f"lost the store and every peer: rank {rank} cannot reach the launcher's store at {address} (no "
            f"answer for {lost:.0f} s), and {failed}",
            f"this host ({host}) is cut off from the other ranks (a network partition), or the store's host is "
            f"down; the reports on the other side name the ranks they lost",
            f"the store is served by torchrun's agent on rank 0's host: an elastic job (--nnodes=MIN:MAX) goes on "
            f"without that host while the --rdzv-endpoint's host is up, resuming from the newest checkpoint on any "
            f"host; losing the endpoint's host ends it: run it again with --resume auto, or keep the rendezvous on "
            f"a host that does not train (docs/checkpoints.md, \"The store's host\")",
            *(f"rank {other}: unreachable from here" for other in others)]
