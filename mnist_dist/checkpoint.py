"""Checkpoints: when to take one, the collectives around it, and the files.

What a checkpoint holds is the trainer's own ``state_dict`` (``trainer.py``), per rank; ``Checkpoints``
gathers the ranks' parts to global rank 0 (every rank's RNG states, the epoch's sums over all ranks),
which writes the full state as one file, and on a resume reads it, broadcasts it and hands every rank
its part back through ``load_state_dict``. Only rank 0 reads and writes files: the other ranks need
no filesystem in common with it.

Layout: ``<out-dir>/checkpoints/step-<global step, 8 digits>.pt``. A file with that name is complete
by construction: it is written under a temporary name, fsynced, then renamed and the directory
fsynced (``outputs.rundir.atomic_path``), so a crash at any moment leaves either the old set of
checkpoints or the old set plus one new complete file — never a partial file with a valid name. Every
file loads with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .config import TrainConfig
from .console import log, warn
from .dist import DistEnv, all_reduce_sum, broadcast_object, checked_barrier, gather_objects
from .errors import UserError
from .outputs.rundir import atomic_path

CHECKPOINT_DIR = "checkpoints"
FORMAT = "mnist-dist-checkpoint"
VERSION = 2  # 2: world-size-free data position (epoch_samples), world_sizes, grad_accum
OLDEST_VERSION = 1  # still resumes: version 2 only added keys
_NAME = re.compile(r"^step-(\d{8})\.pt$")
REQUIRED_KEYS = ("format", "version", "model", "optimizer", "scheduler", "scaler", "epoch",
                 "step_in_epoch", "global_step", "rng", "config", "world_size")


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_path(out_dir: str | os.PathLike, global_step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step-{global_step:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (by name), oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(out_dir: str | os.PathLike, state: dict[str, Any], keep: int,
         before_rename: Callable[[int], None] | None = None) -> Path:
    """Write ``state`` atomically as the checkpoint of ``state['global_step']``; keep the newest ``keep``.
    ``before_rename``: a test hook (the fault injection's ``checkpoint-rename`` point)."""
    final = checkpoint_path(out_dir, state["global_step"])
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        torch.save(state, tmp)
        if before_rename is not None:
            before_rename(state["global_step"])
    prune(out_dir, keep)
    return final


def prune(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and temporary files left by crashed writers."""
    folder = checkpoint_dir(out_dir)
    for stale in folder.glob(".step-*.pt.tmp-*"):
        if not stale.name.endswith(f".tmp-{os.getpid()}.pt"):
            stale.unlink(missing_ok=True)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)


def load(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; any problem is a UserError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; pass a checkpoint file (DIR/checkpoints/step-*.pt), "
                        f"or --resume auto --out-dir DIR")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not an mnist-dist checkpoint")
    version = state.get("version")
    if isinstance(version, int) and version > VERSION:
        raise UserError(f"checkpoint {path} has format version {version}, newer than this mnist-dist reads "
                        f"({OLDEST_VERSION}..{VERSION}); resume it with the newer mnist-dist that wrote it")
    if not isinstance(version, int) or version < OLDEST_VERSION:
        raise UserError(f"checkpoint {path} has format version {version!r}; this mnist-dist reads "
                        f"{OLDEST_VERSION}..{VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return state


def newest_loadable(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that loads; older ones are tried after a warning. None if there is none."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            load(path)
        except UserError as exc:
            warn(f"skipping unusable checkpoint: {exc}")
            continue
        return path
    return None


# ----------------------------------------------------------------------------- resumes and saves
# Training flags that must not change between a checkpoint and its resume.
RESUME_KEYS = ("model", "batch_size", "epochs", "max_steps", "lr", "optimizer", "betas", "schedule", "seed",
               "normalize", "label_smoothing", "weight_decay", "grad_clip", "augment", "aug_degrees",
               "aug_shift", "aug_scale")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> str: ...


class Checkpoints:
    """A run's checkpoints: every ``--checkpoint-every`` steps (``due``), at each epoch end and on a
    stop signal (``save``, a collective), and the ``--resume`` (``resume``, a collective)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.on_saved: Callable[[str | None, dict[str, Any]], None] | None = None  # callbacks.on_checkpoint
        self.before_rename: Callable[[int], None] | None = None  # a test hook (faults.py)

    def due(self, global_step: int) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every) and global_step % every == 0

    def save(self, trainer: Stateful, metrics: dict[str, Any] | None = None) -> str | None:
        """Every rank contributes its state; rank 0 writes; nobody leaves before the file is complete.
        Returns the file's path on rank 0 (None elsewhere)."""
        env = self.env
        checked_barrier(env, self.cfg.dist_timeout)  # names the ranks that did not come
        state = trainer.state_dict()
        rngs = gather_objects(state["rng"], env)
        sums = all_reduce_sum(state["train_sums"].clone(), env)
        path = None
        if env.is_main:
            full = {"format": FORMAT, "version": VERSION, **state, "rng": rngs, "train_sums": sums.detach().cpu()}
            path = str(save(self.cfg.out_dir, full, self.cfg.keep, self.before_rename))
        env.barrier()
        if self.on_saved is not None:
            self.on_saved(path, metrics if metrics is not None else {
                k: state[k] for k in ("epoch", "step_in_epoch", "global_step")})
        return path

    def resume(self, trainer: Stateful) -> str | None:
        """``--resume``: the checkpoint rank 0 chose, restored on every rank (None: a fresh start)."""
        cfg, env = self.cfg, self.env
        source = self.choose()
        if source is None:
            if cfg.resume == "auto":
                log(env, f"no checkpoint in {cfg.out_dir}/checkpoints: starting fresh")
            return None
        # to the CPU first: load_state_dict places every tensor (never map_location=<cuda>)
        full = broadcast_object(load(source, map_location="cpu") if env.is_main else None, env)
        check_resume_compatible(cfg, full, source)
        rngs = full["rng"]
        mine = {**full, "rng": rngs[env.rank] if env.rank < len(rngs) else None,  # more ranks: a fresh stream
                "train_sums": full["train_sums"] if env.is_main else torch.zeros_like(full["train_sums"])}
        note = trainer.load_state_dict(mine)
        log(env, f"resumed from {source} at epoch {full['epoch'] + 1} step {full['step_in_epoch']} "
                 f"(global step {full['global_step']}){'; ' + note if note else ''}")
        return source

    def choose(self) -> str | None:
        """Rank 0 picks the checkpoint (or none); every rank gets the same answer — or the same error."""
        choice: tuple[str | None, str | None] = (None, None)
        if self.env.is_main and self.cfg.resume:
            try:
                if self.cfg.resume == "auto":
                    newest = newest_loadable(self.cfg.out_dir)
                    choice = (str(newest) if newest else None, None)
                else:
                    load(self.cfg.resume)
                    choice = (self.cfg.resume, None)
            except UserError as exc:
                choice = (None, str(exc))
        path, error = broadcast_object(choice, self.env)
        if error:
            raise UserError(error)
        return path


def check_resume_compatible(cfg: TrainConfig, state: dict[str, Any], source: str) -> None:
    """The flags that shape the math must match; world size, nodes, --grad-accum, --amp may change
    (the data position is world-size free: a mid-epoch checkpoint resumes at any world size)."""
    saved = state["config"]
    now = cfg.to_json()  # as config.json writes it (betas as a list)
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in changed)
        raise UserError(f"checkpoint {source} was written with {detail}; resume with the same training flags")
    samples = state.get("epoch_samples")
    if samples is not None and samples != int(state["step_in_epoch"]) * cfg.batch_size:
        raise UserError(f"checkpoint {source} is inconsistent: {samples} samples into the epoch is not "
                        f"{state['step_in_epoch']} global batches of {cfg.batch_size}")
