"""Every rank watches itself; a lost rank is named.

``train.fit`` runs inside ``Watchdog.start(cfg, env)``. For the run, on every rank:

* ``<out-dir>/debug/rank-N.txt`` is open, and ``kill -USR2 <pid>`` makes ``faulthandler`` write all
  of that rank's Python stacks into it (C code: works while the rank is blocked inside a collective;
  training continues). Fatal signals (SIGABRT from NCCL's watchdog, SIGSEGV) write there too.
* Under a launcher, a thread samples where the main thread is (its innermost ``mnist_dist`` frame and
  the step) every half second and publishes a heartbeat every ``--dist-timeout``/10 s
  (``heartbeat.py``). When the main thread makes no progress for 90% of ``--dist-timeout`` it
  writes a stall dump (header + all stacks + Flight Recorder) and one warning line. A collective that
  waited ``HEALED_AFTER`` s or more and then went on (a network stall that healed) is one warning line
  and a ``healed-stall`` event.
* When a collective fails (gloo's timeout, a peer that closed its connection, a monitored barrier
  that names absentees), the failure is turned into a report: which ranks are missing (their
  heartbeat is old or does not advance; or the barrier named them), where each rank was (its last
  heartbeat), where this rank was (the exception's stack); written into ``rank-N.txt`` /
  ``rank-N.json`` with this rank's Flight Recorder dump, and raised as ``RankFailure`` (one
  ``error:`` line plus the report, exit code 4). SIGTERM is ignored while the report is written
  (a few seconds): torchrun sends it the moment another rank fails. A rank whose store does not
  answer either is on the cut-off side of a partition: its report says it lost the store and every
  peer (``report.py``) instead of naming them all missing.
* No store call can hang a rank: each has a deadline (``HeartbeatStore.call``) and none runs under a
  lock the training thread needs. Under a launcher, a failed rank still running ``EXIT_GRACE`` s after
  its failure (its exit path blocked), or a rank whose store has not answered for ``--dist-timeout``
  while it made no progress for ``--dist-timeout`` + ``EXIT_GRACE`` s, prints its report and ends
  from this thread with ``os._exit(4)``: no checkpoint collective on the way out.

Nothing here runs in the training step: the cost is one thread waking twice a second.
``python -m mnist_dist doctor --run-dir DIR`` summarises ``DIR/debug/`` for all ranks.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import EXIT_RANK_FAILURE, RankFailure, StopTraining
from . import flight
from .dumps import StackDumps
from .heartbeat import HeartbeatStore, classify, heartbeat_interval
from .report import barrier_names, cut_off_lines, peer_lines, position_text
from .stacks import HEADER, collective, describe, phase, thread_frames, traceback_frames

STALL_FRACTION = 0.9  # of --dist-timeout without progress: dump the stacks
HEALED_AFTER = 10.0  # s in one collective before going on: logged as a stall that healed
EXIT_GRACE = 30.0  # s: under a launcher, a rank ends this long after its failure whatever its exit blocks on
_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset|refused)|broken pipe|monitoredbarrier|"
                      r"nccl|gloo|peer", re.IGNORECASE)


def is_collective_failure(exc: BaseException) -> bool:
    """torch's distributed errors, and gloo's RuntimeErrors raised inside a collective (a timeout, a
    closed connection, a monitored barrier) — not, say, a DataLoader's timeout."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return (isinstance(exc, RuntimeError) and bool(_FAILURE.search(str(exc)))
            and collective(traceback_frames(exc)) is not None)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|hpp|h):\d+\]\s*", "", text)  # gloo's source location
    return f"{type(exc).__name__}: {text[:300]}"


class Watchdog:
    def __init__(self, cfg: Any, env: Any) -> None:
        self.env, self.timeout = env, float(cfg.dist_timeout)
        self.interval = heartbeat_interval(self.timeout)
        self.out_dir = Path(cfg.out_dir)
        self.debug_dir = self.out_dir / "debug"
        self.txt = self.debug_dir / f"rank-{env.rank}.txt"
        self.json = self.debug_dir / f"rank-{env.rank}.json"
        self.position_of: Any = None  # the loop's Position, once it exists
        self.armed, self.state, self.beat = True, "running", 0
        self.failed_at: list | None = None  # the failure's frames: what this rank's last heartbeats say
        self.store: HeartbeatStore | None = None
        self.report: str | None = None  # the failure report, once written
        self.events: list[dict[str, Any]] = []
        self.identity = {"rank": env.rank, "pid": os.getpid(), "host": socket.gethostname()}
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        # torchrun's agent is this process's parent: when it dies the rank is re-parented
        self.launcher = os.getppid() if "TORCHELASTIC_RESTART_COUNT" in os.environ else None
        self.dumps = StackDumps(cfg.out_dir, env.rank)  # kill -USR2, fatal signals: stacks in rank-N.txt
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def start(cls, cfg: Any, env: Any, dumps: StackDumps | None = None) -> "Watchdog":
        """``dumps``: the entry point's, armed since its first line."""
        watchdog = cls(cfg, env)
        try:
            previous = json.loads(watchdog.json.read_text()) if watchdog.json.is_file() else {}
            watchdog.events = list(previous.get("events", []))  # an earlier attempt's (restart, --resume)
        except (OSError, ValueError):
            pass
        watchdog.dumps = dumps.enable_fatal() if dumps else StackDumps.start(cfg.out_dir, env.rank, fatal=True)
        if watchdog.dumps.fh is None:
            return watchdog
        flight.point_dumps_at(str(watchdog.out_dir))
        watchdog.store = HeartbeatStore.connect(env.rank, timeout_s=min(10.0, max(2.0, watchdog.timeout / 2)),
                                                call_timeout=min(5.0, max(2.0, watchdog.timeout / 4)))
        watchdog._publish(thread_frames())
        watchdog._thread = threading.Thread(target=watchdog._run, name="mnist-dist-watchdog", daemon=True)
        watchdog._thread.start()
        return watchdog

    def watch(self, position: Any) -> None:
        """From now on, positions (epoch, step) come from the loop's ``Position``."""
        self.position_of = position

    def disarm(self) -> None:
        """After the ranks' last barrier: rank 0 works alone; no stall dumps, peers see 'done'."""
        self.armed, self.state = False, "done"
        if self.store is not None:
            self._publish(thread_frames())

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        report = None
        try:
            if exc is not None and self.launcher is not None and os.getppid() != self.launcher:
                self.launcher_gone()  # the root cause, whatever failed after it (a peer that went with it)
            if exc is not None and is_collective_failure(exc):
                report = self.report_failure(exc)
            elif exc is not None and self.store is not None:  # tell the peers, who are about to fail
                stopped = isinstance(exc, (StopTraining, KeyboardInterrupt))
                self.state = "stopped" if stopped else "failed"
                self.failed_at = None if stopped else traceback_frames(exc)
                self._publish(thread_frames())
        except Exception as inner:  # noqa: BLE001 - the original failure matters more than the report's
            print(f"[rank {self.env.rank}] notice: the failure report failed too ({first_line(inner)})",
                  file=sys.stderr, flush=True)
        finally:
            self.close()
        if report is not None:
            raise RankFailure(report) from exc
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1.0)
        self.dumps.close()

    # ------------------------------------------------------------------ positions and heartbeats
    def position(self) -> dict[str, Any]:
        p = self.position_of
        if p is None:
            return {}
        return {"epoch": p.epoch + 1, "step": p.step_in_epoch, "global_step": p.global_step}

    position_text = staticmethod(position_text)

    def _publish(self, frames: list) -> None:
        if self.store is None:
            return
        self.beat += 1
        frames = self.failed_at or frames
        self.store.publish({**self.identity, "beat": self.beat, "time": time.time(), "state": self.state,
                            "where": describe(frames), "phase": phase(frames), **self.position()})

    def _run(self) -> None:
        self._last, self._since, self._stalled = None, time.monotonic(), False
        self._waiting, self._waiting_at = False, {}  # the sample is inside a collective; where the run was
        self._next_beat, failed = self._since + self.interval, False
        while not self._stop.wait(min(0.5, self.interval)):
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - the watchdog outlives whatever it watches
                if not failed:
                    print(f"[rank {self.env.rank}] notice: the watchdog thread hit {first_line(exc)}; it goes on",
                          file=sys.stderr, flush=True)
                failed = True

    def _tick(self) -> None:
        if self.launcher is not None and os.getppid() != self.launcher:
            self.launcher_gone()
        frames = thread_frames()
        sample = (tuple(self.position().values()), describe(frames))
        now = time.monotonic()
        if sample != self._last:
            if self.armed and self._waiting and now - self._since >= HEALED_AFTER:
                self.on_healed(now - self._since)
            self._last, self._since, self._stalled = sample, now, False
            self._waiting, self._waiting_at = collective(frames) is not None, self.position()
        elif self.armed and not self._stalled and now - self._since >= STALL_FRACTION * self.timeout:
            self._stalled = True
            self.on_stall(now - self._since, frames)
        lost = self.store.lost_for() if self.store is not None else None
        if self.armed and lost is not None and lost > self.timeout and now - self._since > self.timeout + EXIT_GRACE:
            self.hard_exit(f"lost the store and every peer: the launcher's store at {self.store.address} has not "
                           f"answered for {lost:.0f} s and this rank made no progress for {now - self._since:.0f} "
                           f"s at {self.position_text(self.position())}, in {describe(frames)}")
        if now >= self._next_beat:
            self._publish(frames)
            self._next_beat = now + self.interval

    def launcher_gone(self) -> None:
        """torchrun's agent died (SIGKILL): end this rank now, with no checkpoint collective (it could
        hang) and no stop file, so that nothing writes into the run directory after its launcher."""
        print(f"[rank {self.env.rank}] error: the launcher (torchrun, pid {self.launcher}) is gone: this rank "
              f"stops without a checkpoint; continue with --resume auto", file=sys.stderr, flush=True)
        os._exit(EXIT_RANK_FAILURE)

    def hard_exit(self, why: str) -> None:
        """End this process now (exit code 4), from the watchdog's thread: the main thread is stuck where
        no deadline reaches (the exit path after a failure, a cut-off host). The report first, if any."""
        prefix = f"[rank {self.env.rank}] "
        lines = (self.report or "").splitlines()
        for i, line in enumerate(lines):
            print(f"{prefix}{'error: ' if i == 0 else '  '}{line}", file=sys.stderr)
        print(f"{prefix}error: {why}: this rank ends now (exit code 4), without a checkpoint; continue with "
              f"--resume auto", file=sys.stderr, flush=True)
        os._exit(EXIT_RANK_FAILURE)

    def guard_exit(self) -> None:
        """Under a launcher (whose process this is: not Ray's), end this rank ``EXIT_GRACE`` s after its
        failure if it has not ended by then (a daemon thread: a normal exit does not wait for it)."""
        if self.env.launcher not in ("torchrun", "env"):
            return

        def guard() -> None:
            time.sleep(EXIT_GRACE)
            self.hard_exit(f"still running {EXIT_GRACE:.0f} s after the failure (stuck on the way out)")

        threading.Thread(target=guard, daemon=True, name="mnist-dist-exit-guard").start()

    # ------------------------------------------------------------------ dumps and reports
    def _write(self, text: str, stacks: bool = True) -> None:
        fh = self.dumps.fh
        if fh is None:
            return
        with self._lock:
            fh.write(text.encode())
            if stacks:
                faulthandler.dump_traceback(file=fh, all_threads=True)
            fh.write(b"\n")

    def _record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if self.dumps.fh is None:
            return
        event["attempt"] = self.attempt
        doc = {**self.identity, "world_size": self.env.world_size, "backend": self.env.backend,
               "dist_timeout": self.timeout, "events": self.events}
        tmp = self.json.with_name(f".{self.json.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # per thread
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.json)

    def _header(self, what: str) -> str:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        return (f"{HEADER}rank {self.env.rank} (pid {self.identity['pid']} on {self.identity['host']}) "
                f"{stamp}: {what}\n")

    def on_stall(self, seconds: float, frames: list) -> None:
        pos, where = self.position(), describe(frames)
        peers = self.store.read(self.env.world_size) if self.store is not None else {}
        status = classify(peers, None, self.env.rank, stale_after=3 * self.interval)
        self._write(self._header(f"no progress for {seconds:.1f} s (--dist-timeout {self.timeout:g} s) at "
                                 f"{self.position_text(pos)}: {where}"))
        flight.dump(self.debug_dir, self.env.rank)
        self._record({"kind": "stall", "time": time.time(), "seconds": seconds, "where": where,
                      "phase": phase(frames), **pos, "peers": peers, "status": status})
        print(f"[rank {self.env.rank}] warning: no progress for {seconds:.0f} s at {self.position_text(pos)}: "
              f"{where}; stacks in {self.txt}", file=sys.stderr, flush=True)

    def on_healed(self, seconds: float) -> None:
        """A collective that waited ``HEALED_AFTER`` s or more, then went on: said and recorded."""
        where, pos = self._last[1], self._waiting_at
        self._record({"kind": "healed-stall", "time": time.time(), "seconds": seconds, "where": where, **pos})
        print(f"[rank {self.env.rank}] warning: waited {seconds:.1f} s in {where} at {self.position_text(pos)}, "
              f"then went on: a network stall that healed, or a rank that was late (--dist-timeout "
              f"{self.timeout:g} s)", file=sys.stderr, flush=True)

    def report_failure(self, exc: BaseException) -> str:
        """The report of a failed collective (see the module docstring); returns its text."""
        self.guard_exit()
        if threading.current_thread() is not threading.main_thread():  # Ray runs training in a thread,
            return self._report(exc)  # where signal handlers cannot be set
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            return self._report(exc)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _report(self, exc: BaseException) -> str:
        self.armed, self.state = False, "failed"
        frames = self.failed_at = traceback_frames(exc)
        where, pos = describe(frames), self.position()
        self._publish(frames)
        peers, status, barrier = self._peer_status(exc)
        lost = self.store.lost_for() if self.store is not None else None
        message = first_line(exc)
        failed = f"a collective failed on rank {self.env.rank} at {self.position_text(pos)}, in {where}: {message}"
        missing = [] if lost is not None else sorted(r for r, s in status.items() if s == "missing")
        if lost is not None:  # the cut-off side: from here every peer looks missing
            status = {rank: "unreachable" for rank in status}
            lines = cut_off_lines(self.env.rank, self.identity["host"], self.store.address, lost, failed,
                                  sorted(status))
        else:
            named = ", ".join(f"rank {r}" for r in missing) if missing else "no rank found missing"
            lines = [f"{'missing: ' if missing else ''}{named}; {failed}",
                     *peer_lines(peers, status, barrier, 3 * self.interval)]
            if self.store is None or self.store.error:
                lines.append(f"(heartbeats unavailable: {self.store.error if self.store else 'no launcher store'})")
        lines.append(f"stacks: {self.txt}; every rank: python -m mnist_dist doctor --run-dir {self.out_dir}")
        self._write(self._header(f"collective failed at {self.position_text(pos)}, in {where}") +
                    "".join(f"  {line}\n" for line in lines) + "Traceback of the failure:\n" +
                    "".join(f"  {f[0]}:{f[1]} in {f[2]}\n" for f in frames) + "All threads now:\n")
        flight.dump(self.debug_dir, self.env.rank)
        self._record({"kind": "failure", "time": time.time(), "error": message, "where": where,
                      "phase": phase(frames), **pos, "missing": missing, "status": status, "peers": peers,
                      "lost_store": lost, "heartbeat_error": self.store.error if self.store else "no launcher store"})
        self.report = "\n".join(lines)
        return self.report

    def _peer_status(self, exc: BaseException) -> tuple[dict, dict[int, str], set[int]]:
        """The peers' last beats, each one's status, and the ranks a monitored barrier named."""
        stale = 3 * self.interval
        peers = self.store.read(self.env.world_size) if self.store is not None else {}
        status = classify(peers, None, self.env.rank, stale)
        if "alive" in status.values():  # a fresh beat may still be a rank that just died: does it advance?
            time.sleep(1.5 * self.interval + 0.5)
            later = self.store.read(self.env.world_size) if self.store is not None else {}
            status = classify(peers, later, self.env.rank, stale)
            peers = {r: later.get(r) or peers.get(r) for r in peers}
        barrier = barrier_names(exc)
        for rank in barrier:
            status[rank] = "missing"
        return peers, status, barrier
