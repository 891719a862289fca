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

import signal
import threading

import torch
import torch.distributed as dist

from ..dist import DistEnv
from .lagged import LaggedRead

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._flag: torch.Tensor | None = None
        self._lagged: LaggedRead | None = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

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
