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
from ..loop.optim import seed_everything
from ..models import clean_state_dict
from . import files

# Training flags that must not change between a checkpoint and its resume.
RESUME_KEYS = ("model", "batch_size", "epochs", "max_steps", "lr", "optimizer", "schedule", "seed",
               "normalize", "label_smoothing", "weight_decay")


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
        "rng": rng,
        "config": trainer.cfg.to_json(),
        "world_size": env.world_size,
        **snapshot.state_dict(),
    }


def restore(trainer: Any, state: dict[str, Any], source: str) -> None:
    """The inverse of ``capture`` on every rank (after ``check_resume_compatible``)."""
    env = trainer.env
    check_resume_compatible(trainer.cfg, env, state, source)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.engine.precision.scaler.load_state_dict(state["scaler"])
    trainer.progress.load_state_dict(state, env.device, holds_sums=env.is_main)
    rngs = state["rng"]
    if env.rank < len(rngs):
        set_rng_state(rngs[env.rank])
    else:  # more ranks than when it was saved (epoch-end checkpoints only): a fresh, distinct stream
        seed_everything(trainer.cfg.seed + env.rank + 1000 * trainer.progress.epoch)


def save(trainer: Any) -> str | None:
    """Collective: capture, rank 0 writes atomically, and nobody leaves before the file is complete."""
    state = capture(trainer)
    path = str(files.save(trainer.cfg.out_dir, state, trainer.cfg.keep)) if state is not None else None
    trainer.env.barrier()
    return path


def check_resume_compatible(cfg: TrainConfig, env: DistEnv, state: dict[str, Any], source: str) -> None:
    saved = state["config"]
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {getattr(cfg, k)})" for k in changed)
        raise UserError(f"checkpoint {source} was written with {detail}; resume with the same training flags")
    if state["world_size"] != env.world_size and int(state["step_in_epoch"]) != 0:
        raise UserError(
            f"checkpoint {source} was written mid-epoch at world size {state['world_size']}; resume it "
            f"with {state['world_size']} processes, or from an epoch-end checkpoint (any world size)"
        )


def choose_resume(cfg: TrainConfig, env: DistEnv) -> str | None:
    """Rank 0 picks the checkpoint (or none) and every rank gets the same answer — or the same error.

    ``--resume auto`` means rank 0's newest file (the run directory is shared). An explicit path is
    each rank's own ``--resume``: the same file under torchrun, a per-worker local copy of the
    same checkpoint under Ray Train (``Checkpoint.as_directory``); rank 0 checks it for everyone."""
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
    return cfg.resume if path and cfg.resume != "auto" else path


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
