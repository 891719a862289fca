"""The tests' instruments: deliberate failures, and a log of the samples each batch used. Nothing here
is imported, nor hooked into the run, unless $MNIST_DIST_FAULT or $MNIST_DIST_INDEX_LOG is set.

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

    MNIST_DIST_INDEX_LOG=PATH   every batch's sample indices, one JSON line per batch, in PATH.rank<R>
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any

from .callbacks import Callback

ENV = "MNIST_DIST_FAULT"
ATTEMPT_ENV = "MNIST_DIST_ATTEMPT"
INDEX_LOG_ENV = "MNIST_DIST_INDEX_LOG"


def install(trainer: Any, checkpoints: Any, callbacks: Any) -> None:
    """Hook the instruments that the environment asks for into this run."""
    if os.environ.get(ENV):
        callbacks.add(FaultInjector())
        checkpoints.before_rename = lambda step: maybe_fail("checkpoint-rename", step)
    if os.environ.get(INDEX_LOG_ENV):
        trainer.batches = IndexLog(trainer.batches, f"{os.environ[INDEX_LOG_ENV]}.rank{trainer.env.rank}")


class FaultInjector(Callback):
    def on_step(self, global_step: int, loss: Any, optimizer: Any) -> None:
        maybe_fail("step", global_step)

    def on_final_writes(self, global_step: int) -> None:
        maybe_fail("epilogue", global_step)


class IndexLog:
    """The device-resident batches (``data.batches.TensorBatches``) of a rank, each batch's sample
    indices appended to ``path`` (a host sync per batch): the tests prove with it that every training
    index is used once per epoch across a resume at another world size."""

    def __init__(self, batches: Any, path: str) -> None:
        self.batches, self.path = batches, path

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start_step: int = 0):
        from .data.batches import rank_indices

        b = self.batches
        order, size = rank_indices(len(b.labels), b.env, b.seed, epoch), b.per_rank_batch
        with open(self.path, "a") as log:
            for step, batch in enumerate(b.epoch(epoch, start_step), start=start_step):
                indices = order[step * size:(step + 1) * size].tolist()
                log.write(json.dumps({"epoch": epoch, "step": step, "indices": indices}) + "\n")
                log.flush()
                yield batch


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
