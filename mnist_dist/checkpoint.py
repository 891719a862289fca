"""Checkpoints: when to take one, the collectives around it, and the files.

A checkpoint holds the trainer's own ``state_dict`` (``trainer.py``), per rank; ``Checkpoints`` gathers
the ranks' parts to global rank 0 (every rank's RNG states, the epoch's sums over all ranks), which
writes the full state as one file, and on a resume reads it, broadcasts it and hands every rank its part
back through ``load_state_dict``. The other ranks need no filesystem in common with rank 0; across hosts
each host keeps a copy (``elastic.py``). Layout: ``<out-dir>/checkpoints/step-<global step, 8 digits>.pt``,
complete by construction: written under a temporary name, fsynced, renamed, the directory fsynced
(``outputs.rundir.atomic_path``): a crash leaves the old set, or it plus one complete file. Every file
loads with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .config import TrainConfig, check_resume_compatible
from .console import log, warn
from .dist import DistEnv, all_reduce_sum, broadcast_object, checked_barrier, gather_objects
from .errors import UserError
from .models import clean_state_dict
from .outputs.rundir import atomic_path

CHECKPOINT_DIR = "checkpoints"
FORMAT = "mnist-dist-checkpoint"
VERSION = 3  # 2: world-size-free data position (epoch_samples), world_sizes, grad_accum; 3: sha256
OLDEST_VERSION = 1  # still resumes: versions 2 and 3 only added keys
_NAME = re.compile(r"^step-(\d{8})(\.pt)?$")  # a file (full format) or a directory (dcp)
# the keys every version has, and the type each must have
REQUIRED_KEYS = {"format": str, "version": int, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict,
                 "epoch": int, "step_in_epoch": int, "global_step": int, "rng": list, "config": dict,
                 "world_size": int}


class CorruptCheckpoint(UserError):
    """The file is not a usable checkpoint (format, checksum, content): an older one may be used."""


class UnreadableCheckpoint(UserError):
    """The file could not be read (permissions, I/O): the run stops, nothing is deleted."""


def content_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes and every plain value,
    in a fixed order; a bit flipped anywhere in a file that still unzips changes it."""
    digest = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            digest.update(f"D{len(x)}".encode())
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(f"L{len(x)}".encode())
            for item in x:
                feed(item)
        else:
            digest.update(f"V{x!r}".encode())

    feed(obj)
    return digest.hexdigest()


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_path(out_dir: str | os.PathLike, global_step: int, sharded: bool = False) -> Path:
    return checkpoint_dir(out_dir) / f"step-{global_step:08d}{'' if sharded else '.pt'}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (by name), oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(out_dir: str | os.PathLike, state: dict[str, Any], keep: int,
         before_rename: Callable[[int], None] | None = None) -> Path:
    """Write ``state`` atomically as the checkpoint of ``state['global_step']`` with its sha256; keep the
    newest ``keep``. A write that fails (a full disk) leaves no temporary file and the older
    checkpoints as they were. ``before_rename``: a test hook (the fault injection's ``checkpoint-rename``)."""
    final = checkpoint_path(out_dir, state["global_step"])
    buffer = io.BytesIO()
    torch.save({**state, "sha256": content_digest(state)}, buffer)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(final) as tmp:
            tmp.write_bytes(buffer.getbuffer())
            if before_rename is not None:
                before_rename(state["global_step"])
    except OSError as exc:
        raise UserError(f"cannot write checkpoint {final}: {exc.strerror or exc}; the earlier checkpoints are "
                        f"intact (make room, then continue with --resume auto)") from None
    prune(out_dir, keep)
    return final


def prune(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and temporary files left by crashed writers."""
    folder = checkpoint_dir(out_dir)
    for stale in [*folder.glob(".step-*.pt.tmp-*"), *folder.glob(".step-*.dcp-tmp")]:
        if not stale.name.endswith(f".tmp-{os.getpid()}.pt"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def load(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint. A file that cannot be read raises ``UnreadableCheckpoint``; one
    that is not a sound checkpoint (format, checksum, types) ``CorruptCheckpoint``; both name the file."""
    path = Path(path)
    sharded = path.is_dir() and any((path / name).exists() for name in ("checksums.json", "run.pt"))
    if path.is_dir() and not sharded:
        raise UserError(f"checkpoint {path} is a directory but no checkpoint; pass DIR/checkpoints/step-*, "
                        f"or --resume auto --out-dir DIR")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        data = read_sharded_run(path) if sharded else path.read_bytes()
    except ValueError as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {exc}") from None
    except OSError as exc:
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {exc.strerror or exc}; nothing was deleted "
                                   f"(fix the file's access, then run again)") from None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated: {load_failure(exc)}") from None
    check_state(path, state)
    return {**state, "dcp": str(path)} if sharded else state


def read_sharded_run(path: Path) -> bytes:
    from . import dcp  # torch.distributed.checkpoint: imported by the runs that use it

    return dcp.read_run(path)


def load_failure(exc: Exception) -> str:
    """torch.load's reason, short: for a weights-only refusal the object refused, not torch's advice
    to load it with ``weights_only=False``."""
    text = " ".join(str(exc).split())
    if text.startswith("Weights only load failed"):
        refused = text.split("trusted source.", 1)[-1].split("Check the documentation", 1)[0]
        refused = refused.replace("WeightsUnpickler error:", "").strip().rstrip(".")[:160]
        return f"it holds an object a weights-only load refuses ({refused}); it was not written by mnist-dist"
    return text[:200] or type(exc).__name__


def check_state(path: Path, state: Any) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CorruptCheckpoint(f"checkpoint {path} is not an mnist-dist checkpoint")
    version = state.get("version")
    if isinstance(version, int) and version > VERSION:
        raise UserError(f"checkpoint {path} has format version {version}, newer than this mnist-dist reads "
                        f"({OLDEST_VERSION}..{VERSION}); resume it with the newer mnist-dist that wrote it")
    if not isinstance(version, int) or version < OLDEST_VERSION:
        raise CorruptCheckpoint(f"checkpoint {path} has format version {version!r}; this mnist-dist reads "
                                f"{OLDEST_VERSION}..{VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    wrong = [k for k, kind in REQUIRED_KEYS.items() if not isinstance(state[k], kind) or isinstance(state[k], bool)
             or (kind is int and state[k] < (1 if k in ("version", "world_size") else 0))]
    if wrong:
        raise CorruptCheckpoint(f"checkpoint {path} has impossible values: {', '.join(f'{k}={state[k]!r}' for k in wrong)}")
    if version >= 3 and state.get("sha256") != content_digest({k: v for k, v in state.items() if k != "sha256"}):
        raise CorruptCheckpoint(f"checkpoint {path} fails its sha256 check: it changed after it was written")


def newest_loadable(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that loads; a corrupt one is skipped with a warning, an unreadable one
    stops everything (``UnreadableCheckpoint``). None if there is none."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            load(path)
        except CorruptCheckpoint as exc:
            warn(f"skipping unusable checkpoint: {exc}")
            continue
        return path
    return None


# ----------------------------------------------------------------------------- resumes and saves
class Stateful(Protocol):
    def state_dict(self, weights: bool = True) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> str: ...


class Checkpoints:
    """A run's checkpoints: every ``--checkpoint-every`` steps (``due``), at each epoch end and on a
    stop signal (``save``, a collective), and the ``--resume`` (``resume``, a collective)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.on_saved: Callable[[str | None, dict[str, Any]], None] | None = None  # callbacks.on_checkpoint
        self.before_rename: Callable[[int], None] | None = None  # a test hook (faults.py)
        self.pending = self.group = None  # --async-checkpoint: the save in flight (dcp.Pending), its process group
        if cfg.checkpoint_format == "dcp":
            from . import dcp  # torch.distributed.checkpoint: imported by the runs that use it

            dcp.check_shared_storage(cfg.out_dir, env)
            self.group = dcp.background_group(env) if cfg.async_checkpoint else None

    def due(self, global_step: int) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every) and global_step % every == 0

    def save(self, trainer: Stateful, metrics: dict[str, Any] | None = None) -> str | None:
        """Every rank contributes its state; rank 0 writes; nobody leaves before the file is complete.
        Returns the file's path on rank 0 (None elsewhere)."""
        env = self.env
        checked_barrier(env, self.cfg.dist_timeout)  # names the ranks that did not come
        state = trainer.state_dict(weights=self.cfg.checkpoint_format == "full")  # dcp: each rank saves its shards
        metrics = metrics if metrics is not None else {k: state[k] for k in ("epoch", "step_in_epoch", "global_step")}
        if self.cfg.checkpoint_format == "dcp":  # every rank writes its shards (dcp.py)
            from . import dcp

            final = checkpoint_path(self.cfg.out_dir, state["global_step"], sharded=True)
            return dcp.save_sharded(self, trainer, {"format": FORMAT, "version": VERSION}, state, final, metrics)
        rngs = gather_objects(state["rng"], env)
        sums = all_reduce_sum(state["train_sums"].clone(), env)
        full = {"format": FORMAT, "version": VERSION, **state, "rng": rngs, "train_sums": sums.detach().cpu()} \
            if env.is_main else None
        path = self.write(full)
        env.barrier()
        if self.on_saved is not None:
            self.on_saved(path, metrics)
        return path

    def write(self, full: dict[str, Any] | None) -> str | None:
        """Rank 0 writes the full checkpoint (``full``: None on the other ranks); its path there."""
        return str(save(self.cfg.out_dir, full, self.cfg.keep, self.before_rename)) if full is not None else None

    def finish(self) -> str | None:
        """Complete the save in flight (``--async-checkpoint``), if any: a collective (``dcp.finish_pending``)."""
        if self.pending is None:
            return None
        from . import dcp

        return dcp.finish_pending(self, content_digest, prune)

    def resume(self, trainer: Stateful) -> str | None:
        """``--resume``: the newest checkpoint that loads and fits (``auto``) or the one named, restored
        on every rank; None: a fresh start, only when there is no checkpoint file at all. A collective."""
        cfg, env = self.cfg, self.env
        if not cfg.resume:
            return None
        candidates = self.candidates()
        for source, holder in candidates:
            full, problem = self.read(source, holder)
            if full is not None:
                check_resume_compatible(cfg, full, source)  # other training flags: never a fallback
                problem = self.restore(trainer, full, source)
                if problem is None:
                    return source
            if cfg.resume != "auto":
                raise UserError(problem)
            if env.is_main:
                warn(f"skipping unusable checkpoint: {problem}")
        if candidates:
            raise UserError(f"none of the {len(candidates)} checkpoint(s) in {checkpoint_dir(cfg.out_dir)} can be "
                            f"used (see the warnings); nothing was deleted: move them away to start afresh, or "
                            f"pass --resume PATH")
        log(env, f"no checkpoint in {cfg.out_dir}/checkpoints: starting fresh")
        return None

    def candidates(self) -> list[tuple[str, int]]:
        """(checkpoint, the rank that reads it), the first to try first: ``--resume PATH``, or every
        checkpoint in rank 0's directory, newest first (rank 0's filesystem decides)."""
        names = [self.cfg.resume] if self.cfg.resume != "auto" else \
            [str(p) for p in reversed(list_checkpoints(self.cfg.out_dir))]
        return [(name, 0) for name in broadcast_object(names if self.env.is_main else None, self.env)]

    def read(self, source: str, holder: int = 0) -> tuple[dict[str, Any] | None, str | None]:
        """Rank ``holder`` loads ``source`` (to the CPU: ``load_state_dict`` places every tensor) and broadcasts
        it: (state, None), or (None, why it is corrupt); an unreadable file is an error on every rank."""
        result: tuple[Any, str | None, str | None] = (None, None, None)
        if self.env.rank == holder:
            try:
                result = (load(source, map_location="cpu"), None, None)
            except CorruptCheckpoint as exc:
                result = (None, str(exc), None)
            except UserError as exc:
                result = (None, None, str(exc))
        state, corrupt, fatal = broadcast_object(result, self.env, holder)
        if fatal:
            raise UserError(fatal)
        return state, corrupt

    def restore(self, trainer: Stateful, full: dict[str, Any], source: str) -> str | None:
        """Every rank loads its part; None when all did, else why it does not fit (the same on every rank)."""
        env, rngs = self.env, full["rng"]
        mine = {**full, "rng": rngs[env.rank] if env.rank < len(rngs) else None,  # more ranks: a fresh stream
                "train_sums": full["train_sums"] if env.is_main else torch.zeros_like(full["train_sums"])}
        note, error = "", None
        try:
            if full.get("dcp"):  # the model and optimizer from every rank's shards, resharded
                from . import dcp

                dcp.load_model_and_optimizer(Path(full["dcp"]), trainer.model, trainer.optimizer)
                mine.update(model=clean_state_dict(trainer.model.state_dict()), optimizer=trainer.optimizer.state_dict())
            note = trainer.load_state_dict(mine)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            error = " ".join(str(exc).split())[:300] or type(exc).__name__
        errors = [e for e in gather_objects(error, env) if e]
        if errors:
            return f"checkpoint {source} does not fit this run's model or optimizer: {errors[0]}"
        log(env, f"resumed from {source} at epoch {full['epoch'] + 1} step {full['step_in_epoch']} "
                 f"(global step {full['global_step']}){'; ' + note if note else ''}")
        return None
