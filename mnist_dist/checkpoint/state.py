"""What a checkpoint holds, and a training run going in (``capture``) and coming back out (``restore``).

The two functions are a symmetric pair over the same parts: the raw model's weights, optimizer,
scheduler, GradScaler, every rank's RNG states, the config and world size, and the loop's
``Progress`` (its own ``state_dict`` / ``load_state_dict``). ``choose_resume`` decides, on rank 0,
which file a ``--resume`` means and tells every rank.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..dist import DistEnv, all_reduce_sum, broadcast_object, gather_objects
from ..errors import UserError
from ..loop.evaluate import TrainSums
from ..loop.optim import load_optimizer_state, seed_everything
from ..models import clean_state_dict
from . import files

# Training flags that must not change between a checkpoint and its resume.
RESUME_KEYS = ("model", "batch_size", "epochs", "max_steps", "lr", "optimizer", "betas", "schedule", "seed",
               "normalize", "label_smoothing", "weight_decay", "grad_clip", "augment", "aug_degrees",
               "aug_shift", "aug_scale")


def capture(trainer: Any) -> dict[str, Any] | None:
    """Collective: every rank contributes its RNG state and epoch sums; the state on rank 0, else None."""
    env, progress = trainer.env, trainer.progress
    rng = gather_objects(rng_state(), env)
    sums = (progress.sums.sums.clone() if progress.sums is not None
            else torch.zeros(3, dtype=torch.float64, device=env.device))
    all_reduce_sum(sums, env)
    in_epoch = progress.step_in_epoch > 0 and trainer.epoch_started > 0
    # this epoch's training seconds so far, without the clock's mid-epoch evaluation pauses
    elapsed = progress.epoch_seconds + (time.perf_counter() - trainer.epoch_started - progress.clock.paused
                                        if in_epoch else 0.0)
    if not env.is_main:
        return None
    snapshot = dataclasses.replace(progress, epoch_seconds=elapsed, sums=TrainSums.of(sums))
    return {
        "format": files.FORMAT,
        "version": files.VERSION,
        "model": clean_state_dict(trainer.model.state_dict()),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.engine.precision.scaler.state_dict(),
        "precision": trainer.engine.precision.name,
        "rng": rng,
        "config": trainer.cfg.to_json(),
        "world_size": env.world_size,
        "grad_accum": trainer.grad_accum,
        # the world-size-free position in this epoch's sample order (see data/batches.py)
        "epoch_samples": progress.step_in_epoch * trainer.cfg.batch_size,
        **snapshot.state_dict(),
    }


def restore(trainer: Any, state: dict[str, Any], source: str) -> str:
    """The inverse of ``capture`` on every rank (after ``check_resume_compatible``). ``state`` was
    loaded to the CPU: ``load_state_dict`` puts each tensor where it belongs (Adam's ``step`` counts
    stay on the CPU, as Adam expects; on a GPU they would cost a host sync per parameter per step).
    Returns a note for the resume line ("" or e.g. "amp bf16 -> fp16")."""
    env = trainer.env
    check_resume_compatible(trainer.cfg, env, state, source)
    trainer.model.load_state_dict(state["model"])
    load_optimizer_state(trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    note = restore_scaler(trainer.engine.precision, state)
    trainer.progress.load_state_dict(state, env.device, holds_sums=env.is_main)
    rngs = state["rng"]
    if env.rank < len(rngs):
        set_rng_state(rngs[env.rank])
    else:  # more ranks than when it was saved (epoch-end checkpoints only): a fresh, distinct stream
        seed_everything(trainer.cfg.seed + env.rank + 1000 * trainer.progress.epoch)
    return note


def restore_scaler(precision: Any, state: dict[str, Any]) -> str:
    """The GradScaler's state, only where it exists and applies. ``--amp`` may change across a resume
    (a requeue onto another GPU type): a bf16/off checkpoint holds a disabled scaler's empty state,
    which an fp16 run's enabled scaler cannot load ("The source state dict is empty"); it starts
    from its initial scale instead. An fp16 checkpoint's scale is ignored by a bf16/off run."""
    saved = state.get("scaler") or {}
    scaler = precision.scaler
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)
    before = state.get("precision") or ("fp16" if saved else None)
    if before is None or before == precision.name:
        return ""
    fresh = " (GradScaler starts at its initial scale)" if scaler.is_enabled() and not saved else ""
    return f"amp {before} -> {precision.name}{fresh}"


def save(trainer: Any) -> str | None:
    """Collective: capture, rank 0 writes atomically, and nobody leaves before the file is complete."""
    state = capture(trainer)
    path = str(files.save(trainer.cfg.out_dir, state, trainer.cfg.keep)) if state is not None else None
    trainer.env.barrier()
    return path


def check_resume_compatible(cfg: TrainConfig, env: DistEnv, state: dict[str, Any], source: str) -> None:
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


def choose_resume(cfg: TrainConfig, env: DistEnv) -> str | None:
    """Rank 0 picks the checkpoint (or none) and every rank gets the same answer — or the same error."""
    choice: tuple[str | None, str | None] = (None, None)
    if env.is_main and cfg.resume:
        try:
            if cfg.resume == "auto":
                newest = files.newest_loadable(cfg.out_dir)
                choice = (str(newest) if newest else None, None)
            else:
                files.load(cfg.resume)
                choice = (cfg.resume, None)
        except UserError as exc:
            choice = (None, str(exc))
    path, error = broadcast_object(choice, env)
    if error:
        raise UserError(error)
    return path


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states (CPU, CUDA, Python, NumPy), all as tensors (weights_only-safe)."""
    py_version, py_ints, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "cpu": torch.get_rng_state(),
        "python": torch.tensor(py_ints, dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if py_gauss is None else py_gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"].cpu().to(torch.uint8))
    gauss = state["python_gauss"].item()
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if gauss != gauss else gauss))
    pos, has_gauss, np_gauss = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].cpu().numpy().astype(np.uint32), int(pos),
                         int(has_gauss), float(np_gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))
