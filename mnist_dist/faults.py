"""Deliberate failures for the fault-tolerance tests. Inert unless $MNIST_DIST_FAULT is set.

    MNIST_DIST_FAULT="ACTION,point=POINT,rank=R,step=S[,attempt=A]"

ACTION is ``kill`` (SIGKILL this process: no cleanup, like the OOM killer) or ``raise`` (an
exception, like a bug). POINT is ``step`` (right after optimizer step S) or ``checkpoint-rename``
(after the checkpoint of step S is written under its temporary name, before the rename).
The fault fires only on global rank R and only while $TORCHELASTIC_RESTART_COUNT equals A (default
0), so a restarted worker group runs clean — the pattern TorchElastic's own tests use.
"""

from __future__ import annotations

import functools
import os
import signal

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
    if int(spec.get("step", -1)) != step:
        return
    if int(spec.get("attempt", 0)) != int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
        return
    if spec["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {point} {step} ({ENV}={os.environ[ENV]})")
