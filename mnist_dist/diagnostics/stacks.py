"""Where a rank is, in words: its innermost ``mnist_dist`` frame and the collective torch runs below it.

Frames are ``(filename, line, function)`` tuples, outermost first. They come from a live thread
(``thread_frames``), from an exception's traceback (``traceback_frames``) or from the text that
``faulthandler`` wrote into ``<out-dir>/debug/rank-N.txt`` (``parse_dumps``, used by ``doctor``).
"""

from __future__ import annotations

import re
import sys
import threading
import traceback
from typing import Any

Frame = tuple[str, int, str]

_FAULTHANDLER_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<name>.*)$')
_FAULTHANDLER_THREAD = re.compile(r"^(?P<current>Current thread|Thread) (?P<id>0x[0-9a-fA-F]+)")
HEADER = "=== "  # our own dumps start with a line like this; SIGUSR2 dumps (written by C code) do not


def short_path(filename: str) -> str:
    """``.../site-packages/torch/x.py`` -> ``torch/x.py``; ``.../mnist_dist/trainer.py`` -> ``mnist_dist/...``."""
    for root in ("mnist_dist", "torch"):
        marker = f"/{root}/"
        if marker in filename:
            return root + "/" + filename.rsplit(marker, 1)[1]
    return filename


def thread_frames(ident: int | None = None) -> list[Frame]:
    """The live stack of thread ``ident`` (default: the main thread), outermost first."""
    ident = threading.main_thread().ident if ident is None else ident
    frame = sys._current_frames().get(ident)
    frames: list[Frame] = []
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return frames[::-1]


def traceback_frames(exc: BaseException) -> list[Frame]:
    return [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(exc.__traceback__)]


def _ours(frame: Frame) -> bool:
    return "/mnist_dist/" in frame[0] and "/mnist_dist/diagnostics/" not in frame[0]


def package_frame(frames: list[Frame]) -> str | None:
    """The innermost frame of our own code (``mnist_dist/trainer.py:87 in train_step``)."""
    for filename, line, name in reversed(frames):
        if _ours((filename, line, name)):
            return f"{short_path(filename)}:{line} in {name}"
    return None


def collective(frames: list[Frame]) -> str | None:
    """The collective (or DDP phase) torch runs below our innermost frame, if any."""
    inner = max((i for i, f in enumerate(frames) if _ours(f)), default=-1)
    below = frames[inner + 1:]
    for filename, _, name in below:
        if filename.endswith("torch/distributed/distributed_c10d.py") and not name.startswith("_"):
            return f"torch.distributed.{name}"
    if any("/torch/autograd/" in f[0] or (f[0].endswith("torch/_tensor.py") and f[2] == "backward") for f in below):
        return "autograd backward (where DDP all-reduces the gradients)"
    if any(f[0].endswith("torch/nn/parallel/distributed.py") for f in below):
        return "DDP forward"
    return None


def describe(frames: list[Frame]) -> str:
    """``torch.distributed.all_reduce <- mnist_dist/metrics.py:88 in evaluate`` (or a part of it)."""
    ours, what = package_frame(frames), collective(frames)
    if ours and what:
        return f"{what} <- {ours}"
    return what or ours or (f"{short_path(frames[-1][0])}:{frames[-1][1]} in {frames[-1][2]}" if frames else "?")


# ----------------------------------------------------------------------------- faulthandler's text
def _is_main(thread: dict[str, Any]) -> bool:
    """faulthandler does not name threads: the main thread's outermost frame is not threading's."""
    frames = thread["frames"]
    return bool(frames) and not frames[0][0].endswith("threading.py")


def parse_dumps(text: str) -> list[dict[str, Any]]:
    """The dumps in a rank's ``debug/rank-N.txt``, oldest first: ``{"header": str | None, "main":
    frames of the main thread (outermost first), "threads": n}``. A dump without our header was
    written on demand (SIGUSR2). A thread id seen twice starts a new dump."""
    dumps: list[dict[str, Any]] = []
    header: str | None = None
    current: dict[str, Any] | None = None
    thread: dict[str, Any] | None = None
    for raw in text.splitlines():
        if raw.startswith(HEADER):
            header, current, thread = raw[len(HEADER):].strip(), None, None
            continue
        if m := _FAULTHANDLER_THREAD.match(raw):
            if current is None or m["id"] in current["ids"]:
                current = {"header": header, "ids": set(), "threads": []}
                dumps.append(current)
                header = None  # a later dump in this section came from SIGUSR2
            current["ids"].add(m["id"])
            thread = {"frames": []}
            current["threads"].append(thread)
            continue
        if thread is not None and (m := _FAULTHANDLER_FRAME.match(raw)):
            thread["frames"].insert(0, (m["file"], int(m["line"]), m["name"]))  # most recent first in the text
    out = []
    for dump in dumps:
        main = next((t["frames"] for t in dump["threads"] if _is_main(t)), [])
        out.append({"header": dump["header"], "main": main, "threads": len(dump["threads"])})
    return out


# what a rank was doing, from the innermost of our functions that names a phase
_PHASES = (
    ("network_check", "start-up network check"), ("warm_up", "warm-up steps"),
    ("save", "checkpoint"), ("final_predictions", "final predictions"),
    ("evaluate", "evaluation"), ("train_step", "training step"), ("stop_if_requested", "stop-signal check"),
    ("batches", "waiting for the next batch"), ("train_epoch", "epoch loop"), ("resume", "resume"),
    ("build", "start-up (data, model)"),
    ("run_metadata", "start-up (run metadata)"), ("fit", "run"),
)


def phase(frames: list[Frame]) -> str | None:
    names = [f[2] for f in frames if _ours(f)]
    for name in reversed(names):
        for function, label in _PHASES:
            if name == function:
                return label
    return None
