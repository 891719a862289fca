"""``--profile``: ``torch.profiler`` over a window of optimizer steps, on every rank.

The schedule is ``--profile-steps WAIT,WARMUP,ACTIVE`` (default 5,5,10: skip 5 steps, warm the
profiler up for 5, record 10). At the window's end each rank writes
``<out-dir>/profile/rank-<N>.pt.trace.json`` (Chrome trace format: opens in Perfetto,
chrome://tracing and TensorBoard's profiler plugin), rank 0 prints the top ops by self time, and
each rank computes its per-step time breakdown, gathered into ``summary.json`` under ``profile``:

    step_ms            one optimizer step (the profiler's ProfilerStep#N ranges)
    data_ms            waiting for the batch (the batch iterator)
    forward_ms         the wrapped model's forward (DDP's buffer broadcast included)
    backward_ms        backward compute: autograd's ops (CPU) or the non-NCCL kernels (CUDA)
    allreduce_wait_ms  the rest of the backward call: DDP waiting for the gradient all_reduce
    optimizer_ms       GradScaler unscale, clipping, optimizer step
    other_ms           everything else (loss, zero_grad, scheduler, metrics, bookkeeping)
    host_sync_ms       time in host syncs (.item(), stream/event synchronize), inside the above
    all_reduce_ms      the gradient all_reduce itself (gloo's thread or NCCL's kernels; overlaps)

The phases are marked only while profiling (``record_function`` around the engine's ``backward`` and
``optimizer_step``, forward hooks, the batch iterator), so the default path pays nothing. On CUDA
the markers also synchronise, in the profiled steps only, so each phase's time is its device time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..callbacks import Callback
from ..dist import DistEnv, gather_objects
from ..errors import UserError

PHASES = ("data", "forward", "backward", "optimizer")


def profile_window(text: str) -> tuple[int, int, int]:
    """``--profile-steps WAIT,WARMUP,ACTIVE`` -> three integers (ACTIVE >= 1)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        wait, warmup, active = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--profile-steps must be WAIT,WARMUP,ACTIVE (three integers), got {text!r}") from None
    if wait < 0 or warmup < 0 or active < 1:
        raise UserError(f"--profile-steps must be WAIT,WARMUP,ACTIVE with WAIT, WARMUP >= 0 and ACTIVE >= 1, "
                        f"got {text!r}")
    return wait, warmup, active
SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaEventSynchronize")


class Markers:
    """record_function ranges around the step's phases, installed for the profiled window only."""

    def __init__(self, trainer: Any, sync: bool) -> None:
        from torch.profiler import record_function

        self.engine, self.resources = trainer.engine, trainer.resources
        device = trainer.env.device

        def marked(name: str, fn: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                with record_function(f"mnist/{name}"):
                    if sync:
                        torch.cuda.synchronize(device)
                    out = fn(*args, **kwargs)
                    if sync:
                        torch.cuda.synchronize(device)
                    return out
            return call

        self.engine.backward = marked("backward", self.engine.backward)  # instance attributes: removed below
        self.engine.optimizer_step = marked("optimizer", self.engine.optimizer_step)
        self.resources.mark_data = lambda: record_function("mnist/data")
        self.open: list[Any] = []

        def before(module: Any, args: Any) -> None:
            if sync:
                torch.cuda.synchronize(device)
            rf = record_function("mnist/forward")
            rf.__enter__()
            self.open.append(rf)

        def after(module: Any, args: Any, output: Any) -> None:
            if sync:
                torch.cuda.synchronize(device)
            if self.open:
                self.open.pop().__exit__(None, None, None)

        self.handles = [trainer.wrapped.register_forward_pre_hook(before),
                        trainer.wrapped.register_forward_hook(after)]

    def remove(self) -> None:
        for name in ("backward", "optimizer_step"):
            self.engine.__dict__.pop(name, None)
        self.resources.mark_data = None
        for handle in self.handles:
            handle.remove()


def _within(event: dict[str, Any], spans: list[tuple[float, float]]) -> bool:
    start, end = event["ts"], event["ts"] + event.get("dur", 0)
    return any(s <= start and end <= t + 1.0 for s, t in spans)


def breakdown(trace: dict[str, Any]) -> dict[str, Any] | None:
    """Per-step milliseconds from a Chrome trace written by torch.profiler (see the module docstring)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    if not steps:
        return None
    main = steps[0]["tid"]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in steps]

    def total(name: str, tid: Any = main) -> float:
        return sum(e["dur"] for e in events if e["name"] == name and e["tid"] == tid and _within(e, spans))

    n = len(steps)
    step = sum(e["dur"] for e in steps)
    phases = {p: total(f"mnist/{p}") for p in PHASES}
    backward_spans = [(e["ts"], e["ts"] + e["dur"]) for e in events
                      if e["name"] == "mnist/backward" and e["tid"] == main and _within(e, spans)]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if kernels:  # CUDA: backward's own kernels, not NCCL's
        compute = sum(e["dur"] for e in kernels if "nccl" not in e["name"].lower() and _within(e, backward_spans))
        all_reduce = sum(e["dur"] for e in kernels if "allreduce" in e["name"].lower() and _within(e, spans))
    else:
        compute = sum(e["dur"] for e in events if e["tid"] == main and _within(e, backward_spans)
                      and e["name"].startswith("autograd::engine::evaluate_function:"))
        all_reduce = sum(e["dur"] for e in events if e["name"] in ("gloo:all_reduce", "nccl:all_reduce")
                         and _within(e, spans))
    compute = min(compute, phases["backward"])
    wait = phases["backward"] - compute
    syncs = sum(e["dur"] for e in events if e["tid"] == main and e["name"] in SYNCS and _within(e, spans))
    ms = 1e-3 / n  # microseconds summed over n steps -> milliseconds per step
    out = {
        "steps": n,
        "step_ms": step * ms,
        "data_ms": phases["data"] * ms,
        "forward_ms": phases["forward"] * ms,
        "backward_ms": compute * ms,
        "allreduce_wait_ms": wait * ms,
        "optimizer_ms": phases["optimizer"] * ms,
        "other_ms": max(0.0, step - sum(phases.values())) * ms,
        "host_sync_ms": syncs * ms,
        "all_reduce_ms": all_reduce * ms,
    }
    out["allreduce_wait_share"] = out["allreduce_wait_ms"] / out["step_ms"] if out["step_ms"] else 0.0
    return out


class StepProfiler(Callback):
    def __init__(self, cfg: Any, trainer: Any) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        self.wait, self.warmup, self.active = profile_window(cfg.profile_steps)
        self.env = trainer.env
        self.dir = Path(cfg.out_dir) / "profile"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank-{self.env.rank}.pt.trace.json"
        cuda = self.env.device.type == "cuda"
        if not cuda:  # kineto's "gpuGetDeviceCount failed" error line means nothing for a CPU run
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(activities=activities, on_trace_ready=self._ready,
                            schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1))
        self.markers: Markers | None = Markers(trainer, sync=cuda)
        self.steps, self.result, self.done = 0, None, False
        self.prof.start()

    def on_step(self, global_step: int, loss: Any, optimizer: Any) -> None:
        if self.done:
            return
        self.prof.step()
        self.steps += 1
        if self.steps >= self.wait + self.warmup + self.active:
            self.stop()

    def stop(self) -> None:
        if self.done:
            return
        self.done = True
        self.prof.stop()  # exports a partial window if the run ended inside it
        if self.markers is not None:
            self.markers.remove()
            self.markers = None

    def _ready(self, prof: Any) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, self.path)
        self.result = breakdown(json.loads(self.path.read_text()))
        if self.env.is_main:
            sort = "self_device_time_total" if self.env.device.type == "cuda" else "self_cpu_time_total"
            print(f"profile (rank 0, {self.active} steps after {self.wait + self.warmup}): top ops by "
                  f"{sort}; traces in {self.dir}", flush=True)
            print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60), flush=True)
            if self.result:
                print("profile per step (rank 0): " + ", ".join(
                    f"{k[:-3]} {v:.2f} ms" for k, v in self.result.items() if k.endswith("_ms")), flush=True)

    def summary(self, env: DistEnv) -> dict[str, Any]:
        """Every rank's breakdown, gathered (a collective)."""
        self.stop()
        rows = gather_objects(self.result, env)
        found = [r for r in rows if r]
        out: dict[str, Any] = {"window": {"wait": self.wait, "warmup": self.warmup, "active": self.active},
                               "traces": [f"profile/rank-{r}.pt.trace.json" for r, row in enumerate(rows) if row],
                               "per_rank": rows}
        if found:
            out["mean"] = {k: sum(r[k] for r in found) / len(found) for k in found[0]}
        else:
            out["error"] = (f"the run ended after {self.steps} steps, before the profile window "
                            f"(--profile-steps {self.wait},{self.warmup},{self.active}) recorded anything")
        return {"profile": out}
