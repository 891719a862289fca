"""Checkpoints of a job that spans hosts, and of its elastic restarts (``Checkpoints.for_run`` picks
``ElasticCheckpoints`` for a run with more than one host, or one that torchrun restarted).

* **A copy on every host.** At start-up (a collective) rank 0 writes a probe file (``outputs/shared.py``) into its checkpoint
  directory and the first rank of every host says whether it sees it. The hosts that do not (no
  shared filesystem) keep a copy of every full checkpoint: rank 0 broadcasts the state it writes, and
  their first ranks write the same file, with the same checksum, under the same ``--out-dir``. Losing
  any host — rank 0's included — then leaves the checkpoints on the others.
* **The newest checkpoint anywhere.** ``--resume auto`` gathers every holder's list, tries the newest
  first, read by a rank that holds it and broadcast (a host that was away during the last saves does
  not hold the job back to its older files).
* **Restarts, recorded.** On a restart (``TORCHELASTIC_RESTART_COUNT`` > 0) the ranks learn how far the
  previous attempt got: from the failure reports its surviving ranks left in ``<out-dir>/debug/`` on
  every host, and from its heartbeats where the store that holds them outlived it (it is served from
  rank 0's host); the steps between that and the checkpoint resumed from are lost work. Each restart goes into
  ``summary.json``'s ``restarts`` (attempt, world size, checkpoint, resumed and reached steps, lost
  steps), and a restart that finds no checkpoint anywhere says so as a warning.

The sharded format (``--checkpoint-format dcp``) is not copied: every rank writes its own shards, so it
needs storage every rank sees, and says so at start-up (``dcp.check_shared_storage``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoints, Stateful, checkpoint_dir, list_checkpoints, save
from .console import log, warn
from .dist import DistEnv, gather_objects
from .errors import UserError
from .outputs.shared import blind_ranks


def restart_count() -> int:
    """0 for the first start of the worker group, 1 after torchrun's first restart, ..."""
    raw = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(raw) if raw.isdigit() else 0


def cpu_copy(state: Any) -> Any:
    """``state`` with every tensor on the CPU (the copies are written, like rank 0's, from host memory)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state


def step_of(name: str) -> int:
    return int(Path(name).name.split("-", 1)[1].split(".")[0])


def recorded_reach(out_dir: str | os.PathLike, attempt: int) -> tuple[int, int] | None:
    """(attempt, global step) of the newest earlier attempt's furthest event in this host's failure
    reports (``<out-dir>/debug/rank-N.json``: a rank whose peer died records where it was)."""
    found = []
    for report in (Path(out_dir) / "debug").glob("rank-*.json"):
        try:
            events = json.loads(report.read_text()).get("events", [])
        except (OSError, ValueError, AttributeError):
            continue
        found += [(e["attempt"], e["global_step"]) for e in events if isinstance(e, dict)
                  and isinstance(e.get("attempt"), int) and e["attempt"] < attempt and isinstance(e.get("global_step"), int)]
    return max(found) if found else None


def beaten_reach(attempt: int, timeout_s: float) -> tuple[int, int] | None:
    """(attempt, global step) from the newest earlier attempt's heartbeats still in the launcher's store
    (there when the store's host outlived that attempt: torchrun serves the workers' store from the
    agent of rank 0's host)."""
    from .diagnostics.heartbeat import HeartbeatStore

    for earlier in range(attempt - 1, -1, -1):
        store = HeartbeatStore.connect(0, timeout_s=min(10.0, timeout_s), attempt=earlier)
        beats = store.read_all() if store is not None else {}
        steps = [b["global_step"] for b in beats.values() if isinstance(b.get("global_step"), int)]
        if steps:
            return earlier, max(steps)
    return None


def previous_reach(attempt: int, env: DistEnv, out_dir: str | os.PathLike, timeout_s: float) -> int | None:
    """The furthest global step the newest earlier attempt reached, from every host's failure reports
    and the store's heartbeats; None if neither says (a collective)."""
    mine = [recorded_reach(out_dir, attempt) if env.is_local_main else None,
            beaten_reach(attempt, timeout_s) if env.is_main else None]
    found = [r for pair in gather_objects(mine, env) for r in pair if r is not None]
    return max(found)[1] if found else None


class ElasticCheckpoints(Checkpoints):
    """``Checkpoints`` with a copy on every host that does not share rank 0's storage, the newest
    checkpoint found across hosts, and every restart recorded (see the module docstring)."""

    def __init__(self, cfg: Any, env: DistEnv) -> None:
        super().__init__(cfg, env)
        self.copies: list[int] = []  # ranks (a host's first) that keep their own copy of each checkpoint
        self.copy_group = None  # rank 0 and those ranks: the checkpoint's state is broadcast to them only
        if env.distributed and env.world_size > env.local_world_size and cfg.checkpoint_format == "full":
            self.copies = blind_ranks(checkpoint_dir(cfg.out_dir), env, hosts_only=True)
            if self.copies:  # a collective: every rank makes the group, its members use it
                self.copy_group = torch.distributed.new_group(ranks=[0, *self.copies])
        hosts = gather_objects(socket.gethostname(), env)
        if self.copies:
            log(env, f"checkpoints: {', '.join(f'rank {r} ({hosts[r]})' for r in self.copies)} do not see rank 0's "
                     f"{checkpoint_dir(cfg.out_dir)}: each keeps a copy of every checkpoint there")
        self.hosts = hosts

    def write(self, full: dict[str, Any] | None) -> str | None:
        """Rank 0 and every copy holder write the checkpoint; an error on any of them stops every rank."""
        if not self.copies:
            return super().write(full)
        env = self.env
        path = error = None
        if env.is_main or env.rank in self.copies:
            box = [cpu_copy(full) if env.is_main else None]  # what rank 0 writes, to the holders of copies
            torch.distributed.broadcast_object_list(box, src=0, group=self.copy_group)
            full = box[0]
            try:
                path = str(save(self.cfg.out_dir, full, self.cfg.keep, self.before_rename if env.is_main else None))
            except UserError as exc:
                error = f"on {self.hosts[env.rank]} (rank {env.rank}): {exc}"
        errors = [e for e in gather_objects(error, env) if e]
        if errors:
            raise UserError(errors[0])
        return path if env.is_main else None

    def candidates(self) -> list[tuple[str, int]]:
        """Every copy on every host, newest first (rank 0's first among equals): (path, holder)."""
        if self.cfg.resume != "auto" or not self.copies:
            return super().candidates()
        env = self.env
        mine = [str(p) for p in list_checkpoints(self.cfg.out_dir)] if env.is_main or env.rank in self.copies else []
        held = [(name, rank) for rank, names in enumerate(gather_objects(mine, env)) for name in names]
        return sorted(held, key=lambda item: (-step_of(item[0]), item[1]))

    def resume(self, trainer: Stateful) -> str | None:
        attempt = restart_count()
        if attempt == 0:
            return super().resume(trainer)
        env, position = self.env, trainer.position  # type: ignore[attr-defined]
        reached = previous_reach(attempt, env, self.cfg.out_dir, self.cfg.dist_timeout)
        source = super().resume(trainer) if self.cfg.resume else None
        resumed = position.global_step if source else 0
        lost = max(0, reached - resumed) if reached is not None else None
        position.restarts.append({"attempt": attempt, "world_size": env.world_size, "resumed_from": source,
                                  "resumed_at_step": resumed, "reached_step": reached, "lost_steps": lost})
        gone = (f"the previous attempt had reached global step {reached}: {lost} step(s) are lost"
                if reached is not None else "how far the previous attempt got is not known")
        if env.is_main and source is None:
            why = ("no checkpoint on any host" if self.cfg.resume else
                   "--resume is not set (pass --resume auto to continue from the newest checkpoint)")
            warn(f"restart {attempt} of this job (torchrun restarted the workers) with {why}: training starts "
                 f"again from step 0; {gone} (summary.json: restarts)")
        elif source is not None:
            log(env, f"restart {attempt} of this job at world size {env.world_size}: resumed at global step "
                     f"{resumed}; {gone.replace('are lost', 'are done again')}")
        return source
