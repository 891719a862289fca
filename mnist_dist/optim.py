"""The optimizer and the learning-rate schedule (stepped every optimizer step)."""

from __future__ import annotations

import warnings

import torch

from .config import TrainConfig


def build_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD; on CUDA the fused implementation (one kernel for all parameters, and with
    fp16 the GradScaler's inf flag is read on the device, not the host)."""
    params = list(params)
    kwargs = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kwargs)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kwargs)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], nesterov=True,
                           weight_decay=cfg.weight_decay, **kwargs)


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``load_state_dict``, keeping THIS optimizer's implementation choices (fused, foreach, ...):
    a checkpoint written on a GPU (fused) resumes on the CPU and the other way round."""
    chosen = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, chosen):
        group.update(keep)
        for param in group["params"]:  # torch checks the groups' sizes, not the moments' shapes
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)}, its parameter "
                                     f"{tuple(param.shape)}")


def rewind_schedule(scheduler, steps: int) -> None:
    """Take ``steps`` scheduler steps back (optimizer steps that fp16's GradScaler skipped), so the
    schedule counts the optimizer steps really taken. Our schedules (OneCycle, cosine, constant) have
    a closed form in ``last_epoch``."""
    if steps <= 0:
        return
    scheduler.last_epoch -= steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns
        closed_form = getattr(scheduler, "_get_closed_form_lr", None)
        lrs = closed_form() if closed_form is not None else scheduler.get_lr()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 1), pct_start=0.25,
            cycle_momentum=False,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: every epoch, or ``--max-steps`` when smaller."""
    full = steps_per_epoch * cfg.epochs
    return min(full, cfg.max_steps) if cfg.max_steps else full
