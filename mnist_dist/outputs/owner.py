"""A run directory has one owner: the run whose global rank 0 holds the lock ``<out-dir>/.owner.lock``.

Rank 0 takes the lock before the run writes anything into the directory and holds it for the run's
whole life; ``.owner.json`` says who holds it (host, pid, since when), so that a second run on the
same directory is refused with one line naming the holder. The lock is the operating system's
(``flock`` through ``filelock``): when its holder dies the kernel releases it at once, and on shared
storage (NFSv4) the server does when the dead host's lease expires (about 90 s). A later run then
takes the directory over with a warning naming the run that never released it. A restart
(``--resume auto``: a SLURM requeue, an elastic or Ray restart) waits up to ``RESTART_WAIT`` seconds
for the previous holder to go.

A directory that already holds anything but an unfinished start's leftovers (an empty ``debug/``)
is refused unless the run resumes it (``--resume``) or replaces it (``--overwrite``, which deletes
the files mnist-dist writes and refuses a directory holding anything else).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from ..console import notice, warn
from ..errors import UserError

OWNER_FILE, LOCK_FILE = ".owner.json", ".owner.lock"
RESTART_WAIT = 120.0  # seconds: longer than an NFSv4 lease (90 s by default)
# what a run writes into its directory: what --overwrite may delete
RUN_OUTPUTS = {"config.json", "metrics.jsonl", "evaluations.jsonl", "summary.json", "model.pt", "model.pt2",
               "confusion_matrix.json", "confusion_matrix.png", "curves.png", "mistakes.png", "checkpoints",
               "debug", "tensorboard", "profile", "wandb", OWNER_FILE, LOCK_FILE}


def holder_of(out: Path) -> dict[str, Any]:
    try:
        holder = json.loads((out / OWNER_FILE).read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class Owner:
    def __init__(self, out: Path, lock: Any) -> None:
        self.out, self.lock = out, lock

    @classmethod
    def claim(cls, out_dir: str | os.PathLike, wait: float = 0.0) -> "Owner":
        """Rank 0's claim on ``out_dir`` until ``release``; a holder that is still there after ``wait``
        seconds is refused (UserError, naming it)."""
        from filelock import FileLock, Timeout

        out = Path(out_dir)
        lock = FileLock(str(out / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = holder_of(out)
            who = f"the run of pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
            if wait > 0:
                notice(f"--out-dir {out} is in use by {who}; waiting up to {wait:.0f} s for it to end (a restart)")
            try:
                lock.acquire(timeout=wait if wait > 0 else 0)
            except Timeout:
                raise UserError(f"--out-dir {out} is in use by {who}; wait for it to end, or choose another "
                                f"--out-dir") from None
        previous, me = holder_of(out), {"host": socket.gethostname(), "pid": os.getpid()}
        if previous.get("pid") and [previous.get("host"), previous.get("pid")] != [me["host"], me["pid"]]:
            warn(f"taking over --out-dir {out} from the run of pid {previous['pid']} on {previous.get('host')}, "
                 f"which ended without giving it up")
        (out / OWNER_FILE).write_text(json.dumps({**me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        return cls(out, lock)

    def release(self) -> None:
        (self.out / OWNER_FILE).unlink(missing_ok=True)
        self.lock.release()
        (self.out / LOCK_FILE).unlink(missing_ok=True)


def check_unused(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a directory that holds another run's files (or anything else); ``overwrite``: delete
    the run files and refuse only foreign ones."""
    out = Path(out_dir)
    taken = sorted(p.name for p in out.iterdir() if p.name not in (OWNER_FILE, LOCK_FILE) and not (
        p.name == "debug" and p.is_dir() and all(f.is_file() and f.stat().st_size == 0 for f in p.iterdir())))
    if not taken:
        return
    if not overwrite:
        raise UserError(f"--out-dir {out} is not empty ({', '.join(taken[:5])}{', ...' if len(taken) > 5 else ''}): "
                        f"continue its run with --resume auto, replace it with --overwrite, or choose another "
                        f"directory")
    foreign = [name for name in taken if name not in RUN_OUTPUTS]
    if foreign:
        raise UserError(f"--overwrite replaces a run, but --out-dir {out} also holds {', '.join(foreign[:5])}, "
                        f"which mnist-dist did not write; choose another directory")
    for name in taken:
        path = out / name
        if name == "debug":  # the ranks of this run may have opened their (empty) dump files already
            for old in path.iterdir():
                if old.stat().st_size > 0:
                    old.unlink()
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
