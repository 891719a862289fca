"""One training run from start to finish: build, resume, the epochs, the summary and the outputs.

``fit(cfg, engine)`` is what ``train_ddp.py`` and ``mnist-dist train`` call on every rank, after the
engine joined the process group. It ends with the ranks' last barrier; after it, global rank 0 writes
the final files (the result line first, then pictures, export and tracking) while the other ranks
may already tear down and exit. The step and the epoch are in ``loop/trainer.py``; what a
checkpoint holds in ``checkpoint/state.py``; the run directory's files in ``outputs/``.
"""

from __future__ import annotations

import socket
import sys
from importlib import metadata
from typing import Any, Callable

import torch

from . import data, faults
from .checkpoint import files as checkpoint_files
from .checkpoint.state import choose_resume
from .config import TrainConfig, grad_accum_steps
from .data.augment import build_batch_transform
from .diagnostics.network import describe as describe_network
from .diagnostics.watchdog import Watchdog
from .dist import DistEnv, broadcast_object, gather_objects, network_check
from .engines.base import Engine
from .engines.prepare import compile_model, configure_torch, prepare_model, uses_sync_batchnorm
from .errors import UserError
from .loop.clock import TargetClock
from .loop.evaluate import EvalResult
from .loop.optim import build_optimizer, build_scheduler, planned_steps, seed_everything
from .loop.progress import Progress
from .loop.trainer import Trainer, log
from .loop.warmup import warm_up
from .models import build_model, count_parameters
from .outputs.report import final_predictions, write_final_outputs
from .outputs.rundir import RunDir
from .outputs.tracking import Tracker


def build_trainer(cfg: TrainConfig, engine: Engine) -> Trainer:
    env = engine.env
    configure_torch(cfg, env, engine.precision.name)
    seed_everything(cfg.seed)
    data.prepare(cfg.data_dir, env, cfg.download)
    train_u8, train_labels = data.load_split(cfg.data_dir, train=True)
    test_u8, test_labels = data.load_split(cfg.data_dir, train=False)
    device = env.device
    per_rank_batch = cfg.batch_size // env.world_size
    if per_rank_batch > len(train_labels) // env.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set")
    if cfg.loader == "tensor":
        batches: Any = data.TensorBatches(
            data.to_float(train_u8, cfg.normalize).to(device), train_labels.to(device), env,
            per_rank_batch, cfg.seed,
        )
    else:
        batches = data.LoaderBatches(cfg.data_dir, cfg.normalize, env, per_rank_batch, cfg.seed,
                                     cfg.num_workers)
    model = prepare_model(build_model(cfg.model), cfg, env).to(device)
    wrapped = compile_model(engine.wrap(model), cfg)
    if engine.unwrap(wrapped) is not model:
        raise RuntimeError(f"engine {engine.name} does not unwrap to the model it wrapped")
    optimizer = build_optimizer(cfg, model.parameters(), device)
    scheduler = build_scheduler(cfg, optimizer, total_steps=planned_steps(cfg, len(batches)))
    return Trainer(
        cfg, env, engine, model, wrapped, optimizer, scheduler, batches,
        data.to_float(test_u8, cfg.normalize).to(device), test_labels.to(device),
        transform=build_batch_transform(cfg, env, per_rank_batch, len(batches)),
        grad_accum=grad_accum_steps(cfg, env.world_size),
        progress=Progress(clock=TargetClock(cfg.eval_every, cfg.target_accuracy)),
    )


def gather_hostnames(env: DistEnv) -> list[str]:
    return sorted(set(gather_objects(socket.gethostname(), env)))


def package_version(name: str) -> str | None:
    """An installed package's version without importing it (torchvision's import costs ~2 s)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_metadata(trainer: Trainer) -> dict[str, Any]:
    """config.json's content. A collective (hostnames): every rank calls it."""
    cfg, env = trainer.cfg, trainer.env
    return {
        "config": cfg.to_json(),
        "world_size": env.world_size,
        "launcher": env.launcher,
        "per_rank_batch": cfg.batch_size // env.world_size,
        "grad_accum_steps": trainer.grad_accum,
        "micro_batch": cfg.batch_size // env.world_size // trainer.grad_accum,
        "steps_per_epoch": len(trainer.batches),
        "backend": env.backend,
        "device": str(env.device),
        "amp": trainer.precision.name,
        "parameters": count_parameters(trainer.model),
        "torch_version": torch.__version__,
        "torchvision_version": package_version("torchvision"),
        "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "hostnames": gather_hostnames(env),
        "python": sys.version.split()[0],
    }


def fit(cfg: TrainConfig, engine: Engine,
        on_checkpoint: Callable[[str | None, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``on_checkpoint``: see ``Trainer.on_checkpoint`` (a launcher that keeps checkpoints itself)."""
    cfg.out_dir = broadcast_object(cfg.out_dir, engine.env)  # ranks may have made different default names
    with Watchdog.start(cfg, engine.env) as watchdog:  # a lost rank is named (diagnostics/watchdog.py)
        return _fit(cfg, engine, watchdog, on_checkpoint)


def _fit(cfg: TrainConfig, engine: Engine, watchdog: Watchdog,
         on_checkpoint: Callable[[str | None, dict[str, Any]], None] | None) -> dict[str, Any]:
    env = engine.env
    run = RunDir(cfg.out_dir, enabled=env.is_main)
    run.create()
    network = {"skipped": True} if cfg.skip_network_check else network_check(env, cfg.dist_timeout)
    if network and not network.get("skipped"):
        log(env, describe_network(network))
    trainer = build_trainer(cfg, engine)
    trainer.on_checkpoint = on_checkpoint
    watchdog.watch(trainer.progress)
    resume_from = resume(trainer, run)
    p = trainer.progress
    p.joined_at(env.world_size)
    meta = run_metadata(trainer)
    meta["resumed_from"] = resume_from
    meta["network"] = network
    run.write_config(meta)
    trainer.tracker = Tracker.start(cfg, env, meta, cfg.out_dir, resume_id=p.tracker_run_id)
    p.tracker_run_id = trainer.tracker.run_id
    trainer.monitor.start(cfg, trainer, meta, resumed=resume_from is not None)  # --profile, --tensorboard
    log(env, f"run dir {cfg.out_dir}: model {cfg.model} ({meta['parameters']:,} parameters), "
             f"world size {env.world_size}, {env.device}, backend {env.backend or 'none'}, "
             f"amp {trainer.precision.name}, global batch {cfg.batch_size}")
    show_progress = env.is_main and cfg.progress and sys.stderr.isatty()
    warmup_seconds = warm_up(trainer, cfg.warmup_steps)  # untimed; state restored after

    trainer.on_evaluation = run.append_evaluation
    trainer.stop.install()
    try:
        test = train_epochs(trainer, run, show_progress)
    finally:
        trainer.stop.restore()

    summary = build_summary(trainer, test, warmup_seconds)
    summary.update(trainer.monitor.summary(env))  # --profile's per-step breakdown (a collective)
    predicted = final_predictions(test, len(trainer.test_labels), env) if cfg.plots else None
    env.barrier()  # after the last collective: from here rank 0 works alone and the others may leave
    watchdog.disarm()
    if env.is_main:
        faults.maybe_fail("epilogue", p.global_step)
        run.save_weights(trainer.model)
        run.write_summary(summary)
        log(env, f"done: test accuracy {test.accuracy:.2%} ({test.correct}/{test.total}) in "
                 f"{p.train_seconds:.1f}s of training; summary in {run.path / 'summary.json'}")
        write_final_outputs(cfg.out_dir, cfg, trainer.model, trainer.test_labels, predicted)
        trainer.monitor.finish(summary, meta)  # --tensorboard: hparams and pictures
        trainer.tracker.finish(summary, cfg.out_dir)
    return summary


def resume(trainer: Trainer, run: RunDir) -> str | None:
    """``--resume``: the checkpoint rank 0 chose, restored on every rank (None: a fresh start)."""
    cfg, env, p = trainer.cfg, trainer.env, trainer.progress
    resume_from = choose_resume(cfg, env)
    if resume_from:
        # Only global rank 0 reads the file and broadcasts it: the other ranks need no filesystem in
        # common with it. To the CPU first; load_state_dict places every tensor (never
        # map_location=<cuda>: see restore).
        state = checkpoint_files.load(resume_from, map_location="cpu") if env.is_main else None
        note = trainer.restore(broadcast_object(state, env), resume_from)
        run.truncate_metrics(after_epoch=p.epoch)
        run.truncate_evaluations(after_step=p.global_step)
        log(env, f"resumed from {resume_from} at epoch {p.epoch + 1} step {p.step_in_epoch} "
                 f"(global step {p.global_step}){'; ' + note if note else ''}")
    elif cfg.resume == "auto":
        log(env, f"no checkpoint in {cfg.out_dir}/checkpoints: starting fresh")
    return resume_from


def train_epochs(trainer: Trainer, run: RunDir, show_progress: bool) -> EvalResult:
    """The epochs that remain: train, evaluate, record, checkpoint. Returns the final evaluation."""
    cfg, env, p = trainer.cfg, trainer.env, trainer.progress
    test: EvalResult | None = None
    while p.epoch < cfg.epochs and not trainer.finished:
        epoch = p.epoch
        loss, accuracy, images, seconds = trainer.train_epoch(show_progress)
        test = trainer.evaluate()
        p.clock.epoch_evaluated(test.accuracy, p.train_seconds + seconds, p.global_step)
        trainer.record_evaluation(test, p.train_seconds + seconds, "epoch")
        record = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "train_accuracy": accuracy,
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "test_correct": test.correct,
            "test_total": test.total,
            "images_per_second": images / seconds if seconds > 0 else 0.0,
            "epoch_seconds": seconds,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "global_step": p.global_step,
            "world_size": env.world_size,
        }
        record.update(trainer.monitor.epoch_record(env, seconds))  # peak memory, data wait (a collective)
        run.append_metrics(record)
        trainer.tracker.log_epoch(record, p.global_step)
        trainer.monitor.log_epoch(record, p.global_step)
        log(env, f"epoch {epoch + 1}/{cfg.epochs}  train_loss {loss:.4f}  train_acc {accuracy:.2%}  "
                 f"test_loss {test.loss:.4f}  test_acc {test.accuracy:.2%} "
                 f"({test.correct}/{test.total})  {record['images_per_second']:,.0f} img/s  "
                 f"{seconds:.1f}s")
        trainer.end_epoch(seconds)
        trainer.save_checkpoint(record)
    return test if test is not None else trainer.evaluate()  # resumed after the last epoch


def build_summary(trainer: Trainer, test: EvalResult, warmup_seconds: float) -> dict[str, Any]:
    """summary.json: the final exact evaluation, where the run ended, time to target, speed settings."""
    cfg, p, scaler = trainer.cfg, trainer.progress, trainer.precision.scaler
    return {
        "test_accuracy": test.accuracy,
        "test_correct": test.correct,
        "test_total": test.total,
        "test_loss": test.loss,
        "world_size": trainer.env.world_size,
        "launcher": trainer.env.launcher,
        "world_sizes": p.world_sizes,  # every world size the run went through (elastic restarts)
        "grad_accum_steps": trainer.grad_accum,
        "train_seconds": p.train_seconds,
        "epochs": p.epoch,
        "global_step": p.global_step,
        "model": cfg.model,
        "recipe": cfg.recipe,
        "per_class_accuracy": test.class_accuracy,
        "per_class_correct": test.class_correct,
        "per_class_total": test.class_total,
        **p.clock.summary(),
        "warmup_seconds": warmup_seconds,
        "amp": trainer.precision.name,
        "grad_scaler_enabled": scaler.is_enabled(),
        "grad_scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode if cfg.compile else None,
        "channels_last": cfg.channels_last,
        "sync_batchnorm": uses_sync_batchnorm(trainer.model),
    }
