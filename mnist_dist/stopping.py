"""Stop signals: SIGTERM, SIGINT and SIGUSR1 only set a flag; the ranks agree on it at a step boundary.

A signal may reach a single rank (``kill`` of one worker, a scheduler that signals one process):
``agreed()`` takes the MAX of every rank's flag with one all_reduce, so all ranks stop at the same
step and save the same checkpoint. A second Ctrl-C interrupts at once.

On CUDA the mid-epoch checks cost no pipeline drain: the flag lives on the device (``fill_`` passes
the signal number as a kernel argument, no host->device copy) and each check acts on the previous
check's agreement (``LaggedRead``), so a stop lands one check later. Epoch ends read it at once.

Only a run on its process's main thread installs handlers (Python allows no other). Ray Train runs
the training function on a thread of its worker actor: there, signals are Ray's business (it
restarts or stops the worker group) and the flag is simply never set.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch
import torch.distributed as dist

from .dist import DistEnv

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
