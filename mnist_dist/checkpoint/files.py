"""Checkpoint files: atomic, self-describing, loadable with ``weights_only=True``.

What goes into a checkpoint, and back out, is ``checkpoint/state.py``; this module only writes,
lists, prunes and loads the files.

Layout: ``<out-dir>/checkpoints/step-<global step, 8 digits>.pt``. A file with that name is complete
by construction: it is written under a temporary name, fsynced, then renamed (and the directory
fsynced), so a crash at any moment leaves either the old set of checkpoints or the old set plus one
new complete file — never a partial file with a valid name.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .. import faults
from ..errors import UserError

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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``state['global_step']``; keep the newest ``keep``."""
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out_dir, state["global_step"])
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    faults.maybe_fail("checkpoint-rename", step=state["global_step"])
    os.replace(tmp, final)
    _fsync_dir(folder)
    prune(out_dir, keep)
    return final


def prune(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and temporary files left by crashed writers."""
    folder = checkpoint_dir(out_dir)
    for stale in folder.glob(".step-*.pt.tmp-*"):
        if not stale.name.endswith(f".tmp-{os.getpid()}"):
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
            print(f"warning: skipping unusable checkpoint: {exc}", file=sys.stderr, flush=True)
            continue
        return path
    return None
