"""Heartbeats: every rank's phase, step and place, a few times per --dist-timeout, in the launcher's store.

A background thread of each rank (``watchdog.py``) publishes ``{"beat": n, "time": unix, "epoch",
"step", "where", "state", "pid", "host"}`` under ``mnist-dist/attempt_<A>/heartbeat/<rank>`` of the
TCPStore that torchrun's agent serves at ``MASTER_ADDR:MASTER_PORT`` (the agent outlives its
workers, so a dead or stopped rank's last beat stays readable). When a collective fails, a survivor
reads every rank's beat: a rank whose beat is old, or does not advance, is the missing one, and its
last beat says where it was. The connection is this module's own client, and every call on it has a
deadline of its own (``HeartbeatStore.call``): a store that went away, or a host cut off from it, costs
seconds, never a hang.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from typing import Any, Callable


def heartbeat_interval(dist_timeout: float) -> float:
    """Seconds between beats: a tenth of --dist-timeout, within [0.5, 5]."""
    return min(5.0, max(0.5, dist_timeout / 10.0))


class StoreUnreachable(Exception):
    """A store call did not answer within its deadline (or one before it still has not)."""


def _run_into(box: dict[str, Any], fn: Callable[..., Any], args: tuple) -> None:
    try:
        box["value"] = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        box["error"] = exc


class HeartbeatStore:
    """This rank's connection to the launcher's store, for heartbeats only (thread-safe).

    Every call has a deadline: it runs in a daemon thread of its own and the caller waits at most
    ``call_timeout`` s for it. A call that does not answer is abandoned, never joined: a TCPStore
    client whose peer host is cut off blocks until TCP gives up (~15 min here, whatever its own
    timeout), and while it does, every later call fails at once instead of queueing behind it. No lock
    is held across a call, so no thread (the training thread least of all) ever waits for the store
    longer than one deadline. The store answers again once the stuck call returns (a healed network).
    """

    def __init__(self, store: Any, rank: int, address: str = "", call_timeout: float = 5.0) -> None:
        self.store, self.rank, self.address, self.call_timeout = store, rank, address, call_timeout
        self.error: str | None = None
        self._guard = threading.Lock()  # guards the two fields below only, never held across a call
        self._inflight: threading.Thread | None = None
        self._since = 0.0  # when the call in flight began (monotonic)
        self._failing: float | None = None  # when the calls began to fail (timed out or refused): the streak

    @classmethod
    def connect(cls, rank: int, timeout_s: float, call_timeout: float = 5.0,
                attempt: int | None = None) -> "HeartbeatStore | None":
        """This rank's store client (None without a launcher store); ``attempt``: another restart
        attempt's beats (default: this one's)."""
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            return None
        import torch.distributed as dist

        def open_store() -> Any:
            return dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=timeout_s))

        box: dict[str, Any] = {}
        opened = threading.Thread(target=_run_into, args=(box, open_store, ()), daemon=True,
                                  name="mnist-dist-store-connect")
        opened.start()
        opened.join(timeout_s + 1.0)  # diagnostics never stop training: no store, no heartbeats
        if "value" not in box:
            return None
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if attempt is None else attempt
        return cls(dist.PrefixStore(f"mnist-dist/attempt_{attempt}/heartbeat/", box["value"]), rank,
                   f"{addr}:{port}", call_timeout)

    def lost_for(self) -> float | None:
        """Seconds since the store stopped answering: since the call that did not answer within its
        deadline began, or the first of the calls that failed since the last one that succeeded (a
        store whose host closed it refuses at once). None: the store answers."""
        with self._guard:
            now = time.monotonic()
            stuck = self._inflight is not None and self._inflight.is_alive() and now - self._since > self.call_timeout
            since = min(t for t in (self._since if stuck else None, self._failing) if t is not None) \
                if stuck or self._failing is not None else None
            return None if since is None else now - since

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the store within ``call_timeout`` s, else StoreUnreachable."""
        deadline = time.monotonic() + self.call_timeout
        while True:
            with self._guard:
                busy, mine = self._inflight, False
                if busy is None or not busy.is_alive():
                    box: dict[str, Any] = {}
                    busy = self._inflight = threading.Thread(target=_run_into, args=(box, fn, args), daemon=True,
                                                             name="mnist-dist-store-call")
                    self._since, mine = time.monotonic(), True
                    busy.start()
                elif time.monotonic() - self._since > self.call_timeout:  # stuck: do not wait behind it
                    deadline = 0.0
            busy.join(max(0.0, deadline - time.monotonic()))
            if busy.is_alive():
                waited = time.monotonic() - self._since
                self._failing = self._since if self._failing is None else self._failing
                raise StoreUnreachable(f"the launcher's store at {self.address} has not answered for {waited:.0f} s")
            if mine:
                break
        if "error" in box:
            self._failing = self._since if self._failing is None else self._failing
            raise box["error"]
        self._failing = None
        return box.get("value")

    def publish(self, beat: dict[str, Any]) -> None:
        try:
            self.call(self.store.set, str(self.rank), json.dumps(beat))
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}"

    def _read_all(self, world_size: int) -> dict[int, Any]:
        return {rank: self.store.get(str(rank)) if self.store.check([str(rank)]) else None
                for rank in range(world_size)}

    def read_all(self, limit: int = 65536) -> dict[int, dict[str, Any]]:
        """Every beat of ranks 0, 1, ... up to the first rank that left none (an earlier attempt's,
        whose world size is not known); {} when the store does not answer."""
        def beats() -> dict[int, Any]:
            found: dict[int, Any] = {}
            while len(found) < limit and self.store.check([str(len(found))]):
                found[len(found)] = json.loads(self.store.get(str(len(found))))
            return found

        try:
            return self.call(beats)
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}"
            return {}

    def read(self, world_size: int) -> dict[int, dict[str, Any] | None]:
        """Every rank's last beat (None: never published, or the store did not answer), with ``age``
        in seconds added."""
        try:
            raws = self.call(self._read_all, world_size)
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}"
            raws = {}
        out: dict[int, dict[str, Any] | None] = {}
        now = time.time()
        for rank in range(world_size):
            raw = raws.get(rank)
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
