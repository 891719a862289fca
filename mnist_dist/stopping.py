"""Stop signals: SIGTERM, SIGINT and SIGUSR1 only set a flag; the ranks agree on it at a step boundary.

A signal may reach a single rank (``kill`` of one worker, a scheduler that signals one process):
``agreed()`` takes the MAX of every rank's flag with one all_reduce, so all ranks stop at the same
step and save the same checkpoint. A second Ctrl-C interrupts at once.

On CUDA the mid-epoch checks cost no pipeline drain: the flag lives on the device (``fill_`` passes
the signal number as a kernel argument, no host->device copy) and each check acts on the previous
check's agreement (``LaggedRead``), so a stop lands one check later. Epoch ends read it at once.

Before the loop, from the first line of the entry point, ``StartupStop`` ends the process at once on
SIGTERM or SIGINT (exit 3, one line, nothing left behind), even while the main thread is blocked in
a rendezvous: Python's C-level handler writes the signal number to a pipe (``signal.set_wakeup_fd``)
that a thread waits on. There is nothing to checkpoint yet.

Only a run on its process's main thread installs handlers (Python allows no other). Ray Train runs
the training function on a thread of its worker actor: there, signals are Ray's business (it
restarts or stops the worker group) and the flag is simply never set.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .console import rank_prefix
from .dist import DistEnv
from .errors import EXIT_STOPPED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0
        self._flag: torch.Tensor | None = None
        self._lagged = None  # lagged.LaggedRead, made with the flag

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """The handlers for the block (the training loop), the previous ones after it. Python runs
        signal handlers in the main thread only: elsewhere (a Ray worker's thread) none is installed."""
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS} if main else {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = self.signum or signum

    def agreed(self, env: DistEnv, at_once: bool = True) -> int:
        """The signal number any rank received (0 if none). A collective: call on every rank.
        ``at_once=False``: on CUDA, the agreement of the previous such call (no host sync)."""
        if not env.distributed:
            return self.signum
        if self._flag is None:
            from .lagged import LaggedRead

            self._flag = torch.zeros(1, dtype=torch.int64, device=env.device)
            self._lagged = LaggedRead(env.device)
        self._flag.fill_(self.signum)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        if at_once:
            return int(self._flag.item())
        previous = self._lagged.exchange(self._flag)
        return previous[0] if previous else 0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StartupStop:
    def __init__(self, cleanups: list[Callable[[], Any]]) -> None:
        self.cleanups = cleanups  # run last-added first when a signal ends the start-up
        self._write_fd: int | None = None
        self._stderr = -1
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls, cleanups: list[Callable[[], Any]]) -> "StartupStop":
        stop = cls(cleanups)
        if threading.current_thread() is threading.main_thread():
            stop._stderr = os.dup(2)  # the terminal's, even if fd 2 is redirected meanwhile (dist.py holds it)
            read_fd, stop._write_fd = os.pipe()
            os.set_blocking(stop._write_fd, False)
            stop._previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
            signal.set_wakeup_fd(stop._write_fd, warn_on_full_buffer=False)
            threading.Thread(target=stop._wait, args=(read_fd,), name="mnist-dist-startup-stop", daemon=True).start()
        return stop

    def _wait(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while data := pipe.read(1):  # empty: ``end`` closed the pipe
                if data[0] in self._previous:
                    os.write(self._stderr, f"{rank_prefix()}stopped by signal {signal_name(data[0])} during "
                                           f"start-up, before training: nothing to checkpoint\n".encode())
                    for cleanup in reversed(self.cleanups):
                        with contextlib.suppress(Exception):
                            cleanup()
                    sys.stdout.flush()
                    os._exit(EXIT_STOPPED)

    def end(self) -> None:
        """The loop takes over (its stop signals checkpoint); the previous handlers come back."""
        if self._write_fd is None:
            return
        signal.set_wakeup_fd(-1)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._write_fd)
        os.close(self._stderr)
        self._write_fd = None
