"""``mnist-dist checkpoint convert SRC DST``: between the two checkpoint formats.

A DCP directory (``--checkpoint-format dcp``, written at any world size, by either engine) becomes one
file of the full format, with its format, version and checksum, so that a sharded run can be
evaluated, exported or resumed as DDP; a full checkpoint becomes a DCP directory. torch's own
``format_utils`` would not do: ``dcp_to_torch_save`` writes a raw dict without our keys, and
``torch_save_to_dcp`` loads with ``weights_only=False``. Everything here loads weights-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import checkpoint, dcp
from ..config import TrainConfig
from ..dist import DistEnv
from ..errors import UserError
from ..models import build_model, check_model, clean_state_dict
from ..optim import build_optimizer, build_scheduler, load_optimizer_state
from ..outputs.rundir import atomic_write_bytes

ONE_PROCESS = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                      backend=None)


def model_and_optimizer(state: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The run's model and optimizer, on the CPU, as its config builds them."""
    config = state["config"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in fields})
    cfg.betas = tuple(cfg.betas)  # type: ignore[assignment]
    check_model(cfg.model)
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg, model.parameters(), torch.device("cpu"))
    build_scheduler(cfg, optimizer, total_steps=1)  # its keys in the param groups (max_lr, ...): loaded too
    return model, optimizer


def to_full(source: Path, target: Path) -> None:
    state = checkpoint.load(source)
    model, optimizer = model_and_optimizer(state)
    dcp.load_model_and_optimizer(source, model, optimizer)
    full = {k: v for k, v in state.items() if k not in ("dcp", "sha256")}
    full.update(model=clean_state_dict(model.state_dict()), optimizer=optimizer.state_dict())
    buffer = io.BytesIO()
    torch.save({**full, "sha256": checkpoint.content_digest(full)}, buffer)
    atomic_write_bytes(target, buffer.getvalue())


def to_dcp(source: Path, target: Path) -> None:
    state = checkpoint.load(source)
    model, optimizer = model_and_optimizer(state)
    model.load_state_dict(state["model"])
    load_optimizer_state(optimizer, state["optimizer"])
    run = {k: v for k, v in state.items() if k != "sha256"} | {"model": {}, "optimizer": {},
                                                                 "version": checkpoint.VERSION}
    pending = dcp.start_save(target, model, optimizer, run, ONE_PROCESS, asynchronous=False)
    dcp.finish_save(pending, ONE_PROCESS, checkpoint.content_digest)


def checkpoint_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-dist checkpoint",
        description="convert SRC DST: a DCP checkpoint directory (--checkpoint-format dcp) into one file "
                    "of the full format, or a full checkpoint file into a DCP directory. The result "
                    "resumes, evaluates and exports like any checkpoint of its format.")
    parser.add_argument("action", choices=["convert"])
    parser.add_argument("source", type=Path, help="a checkpoint: DIR/checkpoints/step-N or step-N.pt")
    parser.add_argument("target", type=Path, help="where to write the other format (must not exist)")
    args = parser.parse_args(argv)
    if args.target.exists():
        raise UserError(f"{args.target} exists; convert into a new path")
    if not args.target.parent.is_dir():
        raise UserError(f"{args.target.parent} is not a directory")
    (to_full if args.source.is_dir() else to_dcp)(args.source, args.target)
    print(args.target, flush=True)
    return 0
