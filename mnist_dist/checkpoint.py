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

import hashlib
import io
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
VERSION = 3  # 2: world-size-free data position (epoch_samples), world_sizes, grad_accum; 3: sha256
OLDEST_VERSION = 1  # still resumes: versions 2 and 3 only added keys
_NAME = re.compile(r"^step-(\d{8})\.pt$")
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
    for stale in folder.glob(".step-*.pt.tmp-*"):
        if not stale.name.endswith(f".tmp-{os.getpid()}.pt"):
            stale.unlink(missing_ok=True)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)


def load(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint. A file that cannot be read raises ``UnreadableCheckpoint``; one
    that is not a sound checkpoint (format, checksum, types) ``CorruptCheckpoint``; both name the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; pass a checkpoint file (DIR/checkpoints/step-*.pt), "
                        f"or --resume auto --out-dir DIR")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {exc.strerror or exc}; nothing was deleted "
                                   f"(fix the file's access, then run again)") from None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated: {load_failure(exc)}") from None
    check_state(path, state)
    return state


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
# Training flags that must not change between a checkpoint and its resume.
# --channels-last, --compile and --sync-bn change the floating-point order: a resume that changed them
# could not be bitwise the run it continues. World size, nodes, --grad-accum, --amp and --engine may
# change (elastic restarts, another GPU type).
RESUME_KEYS = ("model", "batch_size", "epochs", "max_steps", "lr", "optimizer", "betas", "schedule", "seed",
               "normalize", "label_smoothing", "weight_decay", "grad_clip", "augment", "aug_degrees",
               "aug_shift", "aug_scale", "channels_last", "compile", "sync_bn")


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
        """``--resume``: the newest checkpoint that loads and fits (``auto``) or the one named, restored
        on every rank; None: a fresh start, only when there is no checkpoint file at all. A collective."""
        cfg, env = self.cfg, self.env
        if not cfg.resume:
            return None
        names = [cfg.resume] if cfg.resume != "auto" else [str(p) for p in reversed(list_checkpoints(cfg.out_dir))]
        candidates = broadcast_object(names if env.is_main else None, env)  # rank 0's filesystem decides
        for source in candidates:
            full, problem = self.read(source)
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

    def read(self, source: str) -> tuple[dict[str, Any] | None, str | None]:
        """Rank 0 loads ``source`` (to the CPU: ``load_state_dict`` places every tensor) and broadcasts
        it: (state, None), or (None, why it is corrupt); an unreadable file is an error on every rank."""
        result: tuple[Any, str | None, str | None] = (None, None, None)
        if self.env.is_main:
            try:
                result = (load(source, map_location="cpu"), None, None)
            except CorruptCheckpoint as exc:
                result = (None, str(exc), None)
            except UserError as exc:
                result = (None, None, str(exc))
        state, corrupt, fatal = broadcast_object(result, self.env)
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
            note = trainer.load_state_dict(mine)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            error = " ".join(str(exc).split())[:300] or type(exc).__name__
        errors = [e for e in gather_objects(error, env) if e]
        if errors:
            return f"checkpoint {source} does not fit this run's model or optimizer: {errors[0]}"
        log(env, f"resumed from {source} at epoch {full['epoch'] + 1} step {full['step_in_epoch']} "
                 f"(global step {full['global_step']}){'; ' + note if note else ''}")
        return None


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
