"""Heartbeats: every rank's phase, step and place, a few times per --dist-timeout, in the launcher's store.

A background thread of each rank (``watchdog.py``) publishes ``{"beat": n, "time": unix, "epoch",
"step", "where", "state", "pid", "host"}`` under ``mnist-dist/attempt_<A>/heartbeat/<rank>`` of the
TCPStore that torchrun's agent serves at ``MASTER_ADDR:MASTER_PORT`` (the agent outlives its
workers, so a dead or stopped rank's last beat stays readable). When a collective fails, a survivor
reads every rank's beat: a rank whose beat is old, or does not advance, is the missing one, and its
last beat says where it was. The connection is this module's own client, with a short timeout, so a
store that went away costs seconds, never a hang.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from typing import Any


def heartbeat_interval(dist_timeout: float) -> float:
    """Seconds between beats: a tenth of --dist-timeout, within [0.5, 5]."""
    return min(5.0, max(0.5, dist_timeout / 10.0))


class HeartbeatStore:
    """This rank's connection to the launcher's store, for heartbeats only (thread-safe)."""

    def __init__(self, store: Any, rank: int) -> None:
        self.store, self.rank = store, rank
        self.lock = threading.Lock()
        self.error: str | None = None

    @classmethod
    def connect(cls, rank: int, timeout_s: float) -> "HeartbeatStore | None":
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            return None
        import torch.distributed as dist

        try:
            store = dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 - diagnostics never stop training
            return None
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(dist.PrefixStore(f"mnist-dist/attempt_{attempt}/heartbeat/", store), rank)

    def publish(self, beat: dict[str, Any]) -> None:
        try:
            with self.lock:
                self.store.set(str(self.rank), json.dumps(beat))
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}"

    def read(self, world_size: int) -> dict[int, dict[str, Any] | None]:
        """Every rank's last beat (None: never published), with ``age`` in seconds added."""
        out: dict[int, dict[str, Any] | None] = {}
        now = time.time()
        for rank in range(world_size):
            key = str(rank)
            try:
                with self.lock:
                    raw = self.store.get(key) if self.store.check([key]) else None
            except Exception as exc:  # noqa: BLE001
                self.error = f"{type(exc).__name__}: {exc}"
                raw = None
            beat = json.loads(raw) if raw else None
            if beat is not None:
                beat["age"] = max(0.0, now - float(beat.get("time", now)))
            out[rank] = beat
        return out


def classify(first: dict[int, dict | None], second: dict[int, dict | None] | None, me: int,
             stale_after: float) -> dict[int, str]:
    """Each other rank's status from one or two reads of the beats: ``missing`` (no beat, an old beat,
    or one that did not advance between the reads), ``failed`` / ``done`` / ``stopped`` (it said so),
    ``alive``."""
    status: dict[int, str] = {}
    for rank, beat in first.items():
        if rank == me:
            continue
        later = (second or {}).get(rank) or beat
        if later is None:
            status[rank] = "missing"
        elif later.get("state") in ("failed", "done", "stopped"):
            status[rank] = later["state"]
        elif second is not None and beat is not None:
            status[rank] = "alive" if later["beat"] != beat["beat"] else "missing"
        else:
            status[rank] = "missing" if later["age"] > stale_after else "alive"
    return status
