"""Deliberate failures for the fault-tolerance tests. Inert unless $MNIST_DIST_FAULT is set.

    MNIST_DIST_FAULT="ACTION,point=POINT,rank=R[,step=S][,attempt=A][,seconds=T]"

ACTION is ``kill`` (SIGKILL this process: no cleanup, like the OOM killer), ``raise`` (an
exception, like a bug) or ``delay`` (sleep T seconds, like slow storage or a slow upload). POINT is
``step`` (right after optimizer step S), ``checkpoint-rename`` (after the checkpoint of step S is
written under its temporary name, before the rename) or ``epilogue`` (rank 0's final writes, after
the ranks' last barrier). Without ``step=`` the fault fires at any step.
The fault fires only on global rank R and only while $TORCHELASTIC_RESTART_COUNT equals A (default
0), so a restarted worker group runs clean — the pattern TorchElastic's own tests use; ``attempt=*``
fires in every attempt.
"""

from __future__ import annotations

import functools
import os
import signal
import time

ENV = "MNIST_DIST_FAULT"


@functools.lru_cache(maxsize=1)  # read once: maybe_fail runs after every optimizer step
def _spec() -> dict[str, str] | None:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    action, *pairs = raw.split(",")
    spec = {"action": action.strip()}
    for pair in pairs:
        key, _, value = pair.partition("=")
        spec[key.strip()] = value.strip()
    return spec


def maybe_fail(point: str, step: int) -> None:
    spec = _spec()
    if spec is None or spec.get("point", "step") != point:
        return
    if int(spec.get("rank", 0)) != int(os.environ.get("RANK", 0)):
        return
    if "step" in spec and int(spec["step"]) != step:
        return
    attempt = spec.get("attempt", "0")
    if attempt != "*" and int(attempt) != int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
        return
    if spec["action"] == "delay":
        time.sleep(float(spec.get("seconds", 0)))
        return
    if spec["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {point} {step} ({ENV}={os.environ[ENV]})")
