"""Deliberate failures for the fault-tolerance tests. Inert unless $MNIST_DIST_FAULT is set.

    MNIST_DIST_FAULT="ACTION,point=POINT,rank=R[,step=S][,attempt=A][,seconds=T][;ACTION,...]"

ACTION is ``kill`` (SIGKILL this process: no cleanup, like the OOM killer), ``raise`` (an
exception, like a bug) or ``delay`` (sleep T seconds, like slow storage or a slow upload). POINT is
``step`` (right after optimizer step S), ``checkpoint-rename`` (after the checkpoint of step S is
written under its temporary name, before the rename) or ``epilogue`` (rank 0's final writes, after
the ranks' last barrier). Without ``step=`` the fault fires at any step.
The fault fires only on global rank R and only while the worker group's attempt equals A (default
0), so a restarted worker group runs clean — the pattern TorchElastic's own tests use; ``attempt=*``
fires in every attempt. The attempt is $TORCHELASTIC_RESTART_COUNT under torchrun, and
$MNIST_DIST_ATTEMPT (the count of earlier worker-group starts, set by the Ray launcher) under Ray.
Several faults are separated by ``;`` (e.g. slow steps on rank 0, then a kill of rank 1).
"""

from __future__ import annotations

import functools
import os
import signal
import time

ENV = "MNIST_DIST_FAULT"
ATTEMPT_ENV = "MNIST_DIST_ATTEMPT"


def current_attempt() -> int:
    """0 for the first start of the worker group, 1 after one restart, ..."""
    return int(os.environ.get(ATTEMPT_ENV) or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


@functools.lru_cache(maxsize=1)  # read once: maybe_fail runs after every optimizer step
def _specs() -> tuple[dict[str, str], ...]:
    specs = []
    for raw in os.environ.get(ENV, "").split(";"):
        if not raw.strip():
            continue
        action, *pairs = raw.strip().split(",")
        spec = {"action": action.strip()}
        for pair in pairs:
            key, _, value = pair.partition("=")
            spec[key.strip()] = value.strip()
        specs.append(spec)
    return tuple(specs)


def maybe_fail(point: str, step: int) -> None:
    for spec in _specs():
        _maybe_fire(spec, point, step)


def _maybe_fire(spec: dict[str, str], point: str, step: int) -> None:
    if spec.get("point", "step") != point:
        return
    if int(spec.get("rank", 0)) != int(os.environ.get("RANK", 0)):
        return
    if "step" in spec and int(spec["step"]) != step:
        return
    attempt = spec.get("attempt", "0")
    if attempt != "*" and int(attempt) != current_attempt():
        return
    if spec["action"] == "delay":
        time.sleep(float(spec.get("seconds", 0)))
        return
    if spec["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {point} {step} ({ENV}={os.environ[ENV]})")
