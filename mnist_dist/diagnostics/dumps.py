"""A rank's stacks on demand: ``kill -USR2 <pid>`` makes ``faulthandler`` write every Python stack of
that process into ``<out-dir>/debug/rank-N.txt`` (C code: it works while the rank is blocked inside a
collective, and training continues). Under a process group fatal signals (SIGABRT from NCCL's
watchdog, SIGSEGV) write there too. A run that needed no dump leaves no ``debug/`` behind.

In one process this is all the run's watching; under a process group ``watchdog.py`` builds on it.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from pathlib import Path
from typing import Any

from ..console import notice


class StackDumps:
    def __init__(self, out_dir: str | os.PathLike, rank: int) -> None:
        self.out_dir = Path(out_dir)
        self.debug_dir = self.out_dir / "debug"
        self.txt = self.debug_dir / f"rank-{rank}.txt"
        self.fh: Any = None
        self._fatal = False  # faulthandler was enabled here (fatal signals)
        self._made_out_dir = False  # this rank made the run directory (a node without shared storage)

    @classmethod
    def start(cls, out_dir: str | os.PathLike, rank: int, fatal: bool = False) -> "StackDumps":
        dumps = cls(out_dir, rank)
        try:
            dumps._made_out_dir = not dumps.out_dir.exists()
            dumps.debug_dir.mkdir(parents=True, exist_ok=True)
            dumps.fh = open(dumps.txt, "ab", buffering=0)
        except OSError as exc:
            notice(f"no stack dumps for rank {rank}: cannot write {dumps.txt} ({exc.strerror})")
            return dumps
        faulthandler.register(signal.SIGUSR2, file=dumps.fh, all_threads=True, chain=False)
        return dumps.enable_fatal() if fatal else dumps

    def enable_fatal(self) -> "StackDumps":
        """Fatal signals (SIGABRT, SIGSEGV) dump the stacks here too."""
        if self.fh is not None and not faulthandler.is_enabled():
            faulthandler.enable(file=self.fh, all_threads=True)
            self._fatal = True
        return self

    def watch(self, position: Any) -> None:
        """(The watchdog follows the run's position; one process has no peers to tell.)"""

    def disarm(self) -> None:
        pass

    def __enter__(self) -> "StackDumps":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return False

    def close(self) -> None:
        if self.fh is None:
            return
        faulthandler.unregister(signal.SIGUSR2)
        if self._fatal:
            faulthandler.disable()
        self.fh.close()
        self.fh = None
        try:  # a run that needed no dump leaves no debug/ behind
            if self.txt.stat().st_size == 0:
                self.txt.unlink()
                self.debug_dir.rmdir()
                if self._made_out_dir:  # nothing of the run lives on this node (rank 0's node has it)
                    self.out_dir.rmdir()
        except OSError:
            pass  # another rank's files are there
