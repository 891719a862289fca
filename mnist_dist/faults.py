"""Deliberate failures for the fault-tolerance tests. Inert unless $MNIST_DIST_FAULT is set.

    MNIST_DIST_FAULT="ACTION,point=POINT,rank=R,step=S[,attempt=A]"

ACTION is ``kill`` (SIGKILL this process: no cleanup, like the OOM killer) or ``raise`` (an
exception, like a bug). POINT is ``step`` (right after optimizer step S) or ``checkpoint-rename``
(after the checkpoint of step S is written under its temporary name, before the rename).
The fault fires only on global rank R and only while the worker group's attempt equals A (default
0), so a restarted worker group runs clean — the pattern TorchElastic's own tests use. The attempt
is $TORCHELASTIC_RESTART_COUNT under torchrun, and $MNIST_DIST_ATTEMPT (the count of earlier
worker-group starts, set by the Ray launcher) under Ray Train.
"""

from __future__ import annotations

import functools
import os
import signal

ENV = "MNIST_DIST_FAULT"
ATTEMPT_ENV = "MNIST_DIST_ATTEMPT"


def current_attempt() -> int:
    """0 for the first start of the worker group, 1 after one restart, ..."""
    return int(os.environ.get(ATTEMPT_ENV) or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


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
    if int(spec.get("step", -1)) != step:
        return
    if int(spec.get("attempt", 0)) != current_attempt():
        return
    if spec["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {point} {step} ({ENV}={os.environ[ENV]})")
