"""One training run from start to finish, read top to bottom: ``fit`` and the epoch it repeats.

``fit(cfg, engine)`` runs on every rank once the engine has joined the process group: build the
trainer, resume, then for each epoch and step: batch -> ``train_step`` -> maybe evaluate (the
clock's cadence) -> observers -> maybe checkpoint (the checkpoints' cadence) -> maybe stop (the stop
signal's cadence). Every epoch ends with the exact evaluation, its record and a checkpoint. After the
ranks' last barrier global rank 0 writes the final files while the others may already leave.
"""

from __future__ import annotations

import os
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .callbacks import Callback, Callbacks
from .checkpoint import Checkpoints
from .config import TrainConfig
from .console import log, warn
from .dist import DistEnv, broadcast_object, checked_barrier, gather_objects
from .engines._base import Engine, uses_sync_batchnorm
from .errors import StopTraining
from .metrics import EvalResult, final_predictions
from .models import count_parameters
from .outputs.report import write_final_outputs
from .outputs.rundir import RunDir
from .stopping import signal_name
from .trainer import Trainer, train_step


def fit(cfg: TrainConfig, engine: Engine, callbacks: list[Callback] | None = None, dumps: Any = None,
        startup: Any = None) -> dict[str, Any]:
    """The run; returns summary.json's content. ``callbacks``: a launcher's own observers (Ray's);
    ``dumps``, ``startup``: the entry point's stack dumps and start-up stop (``entry.run_training``)."""
    env = engine.env
    cfg.out_dir = broadcast_object(cfg.out_dir, env)  # ranks may have made different default names
    # a lost rank is named, stacks on SIGUSR2; the directory is this run's alone until it ends
    with watch_ranks(cfg, env, dumps) as watchdog, RunDir.open(cfg, env) as run:
        if startup is not None:
            startup.cleanups.append(run.close)
        network = check_network(cfg, env)
        trainer = Trainer.build(cfg, engine)
        checkpoints = make_checkpoints(cfg, env)
        resumed_from = checkpoints.resume(trainer)
        if resumed_from:
            run.truncate_to(trainer.position.epoch, trainer.position.global_step)
        trainer.position.joined_at(env.world_size)
        watchdog.watch(trainer.position)
        meta = run_metadata(trainer, resumed_from, network)
        if startup is not None:
            startup.end()  # from here a stop signal is the loop's: a checkpoint at the next check
        with trainer.stop.installed():
            run.write_config(meta)
            observers = start_observers(cfg, trainer, meta, resumed_from, callbacks or [])
            checkpoints.on_saved = observers.on_checkpoint
            if any(name in os.environ for name in ("MNIST_DIST_FAULT", "MNIST_DIST_INDEX_LOG")):
                from . import faults  # the tests' instruments

                faults.install(trainer, checkpoints, observers)
            log(env, f"run dir {cfg.out_dir}: model {cfg.model} ({meta['parameters']:,} parameters), world size "
                     f"{env.world_size}, {env.device}, backend {env.backend or 'none'}, amp "
                     f"{trainer.precision.name}, global batch {cfg.batch_size}")
            trainer.warm_up(cfg.warmup_steps)  # untimed; the state put back after
            test = None
            while not trainer.finished:
                test = train_epoch(trainer, run, checkpoints, observers)
            checkpoints.finish()  # an asynchronous save still in flight
        test = test or trainer.evaluate()  # resumed after the last epoch
        summary = {**build_summary(trainer, test), **observers.summary(env)}  # --profile's is a collective
        predicted = final_predictions(test, len(trainer.test_labels), env) if cfg.plots else None
        weights = engine.model_state(trainer.model)  # model.pt's state: a collective under fsdp2
        env.barrier()  # after the last collective: from here rank 0 works alone and the others may leave
        watchdog.disarm()
        if env.is_main:
            observers.on_final_writes(trainer.position.global_step)
            run.save_weights(weights)
            run.write_summary(summary)
            log(env, f"done: test accuracy {test.accuracy:.2%} ({test.correct}/{test.total}) in "
                     f"{trainer.clock.train_seconds:.1f}s of training; summary in {run.path / 'summary.json'}")
            write_final_outputs(cfg.out_dir, cfg, engine.final_model(trainer.model, weights), trainer.test_labels,
                                predicted)
            observers.on_end(summary, meta)
    return summary


def train_epoch(trainer: Trainer, run: RunDir, checkpoints: Checkpoints, observers: Callbacks) -> EvalResult:
    """The rest of the epoch in progress, its exact evaluation, its record and checkpoint."""
    cfg, env, position, clock = trainer.cfg, trainer.env, trainer.position, trainer.clock
    bar = progress_bar(trainer)
    trainer.model.train()
    trainer.resources.start_epoch(env.device)
    clock.start_epoch(env.device)
    for step, x, y in trainer.epoch_batches():
        if trainer.finished:
            break
        loss = train_batch(trainer, step, x, y, run, checkpoints, observers)
        bar.update(1)
        if not bar.disable and (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = clock.stop_epoch(env.device)
    bar.close()
    checked_barrier(env, cfg.dist_timeout)  # names the ranks that did not reach the epoch's end
    trainer.reconcile_schedule()
    stop_if_requested(trainer, checkpoints)
    loss, accuracy, images = trainer.sums.reduce(env)
    test = trainer.evaluate()
    clock.evaluated(test.accuracy, clock.total(), position.global_step)
    run.append_evaluation(evaluation_record(trainer, test, clock.total(), "epoch"))
    record = {"epoch": position.epoch + 1, "train_loss": loss, "train_accuracy": accuracy,
              "test_loss": test.loss, "test_accuracy": test.accuracy, "test_correct": test.correct,
              "test_total": test.total, "images_per_second": images / seconds if seconds > 0 else 0.0,
              "epoch_seconds": seconds, "lr": trainer.optimizer.param_groups[0]["lr"],
              "global_step": position.global_step, "world_size": env.world_size,
              **trainer.resources.epoch_record(env, seconds)}  # peak memory, data wait (a collective)
    run.append_metrics(record)
    observers.on_epoch(record, position.global_step)
    log(env, f"epoch {record['epoch']}/{cfg.epochs}  train_loss {loss:.4f}  train_acc {accuracy:.2%}  "
             f"test_loss {test.loss:.4f}  test_acc {test.accuracy:.2%} ({test.correct}/{test.total})  "
             f"{record['images_per_second']:,.0f} img/s  {seconds:.1f}s")
    trainer.end_epoch()
    checkpoints.save(trainer, metrics=record)
    return test


def train_batch(trainer: Trainer, step: int, x: torch.Tensor, y: torch.Tensor, run: RunDir,
                checkpoints: Checkpoints, observers: Callbacks) -> torch.Tensor:
    """One batch: the step, then whatever is due after it. No host sync unless something due needs
    one (an evaluation, wandb, a checkpoint)."""
    cfg, position, clock = trainer.cfg, trainer.position, trainer.clock
    loss = train_step(trainer, x, y)
    position.step_in_epoch = step + 1
    if clock.evaluation_due(position.global_step):  # every --eval-every steps, the clock paused
        result, seconds = clock.paused_for(trainer.evaluate, trainer.env.device, position.global_step)
        run.append_evaluation(evaluation_record(trainer, result, seconds, "step"))
    observers.on_step(position.global_step, loss, trainer.optimizer)
    if checkpoints.due(position.global_step):
        checkpoints.save(trainer)
    if position.global_step % cfg.stop_check_every == 0:  # on CUDA: acts on the previous check's values
        trainer.reconcile_schedule(at_once=False)
        stop_if_requested(trainer, checkpoints, at_once=False)
    return loss


def stop_if_requested(trainer: Trainer, checkpoints: Checkpoints, at_once: bool = True) -> None:
    """When any rank got a stop signal (the ranks agree: a collective): checkpoint, say how to
    continue, and stop every rank at the same step (exit code 3)."""
    signum = trainer.stop.agreed(trainer.env, at_once)
    if not signum:
        return
    path = checkpoints.save(trainer)
    path = checkpoints.finish() or path  # an asynchronous save completes before the stop
    p = trainer.position
    log(trainer.env, f"stopped by signal {signal_name(signum)} at epoch {p.epoch + 1} step {p.step_in_epoch} "
                     f"(global step {p.global_step}); checkpoint {path}; continue with --resume auto "
                     f"--out-dir {trainer.cfg.out_dir}")
    raise StopTraining(signum, path)


def evaluation_record(trainer: Trainer, result: EvalResult, train_seconds: float, kind: str) -> dict[str, Any]:
    """A line of evaluations.jsonl: every exact evaluation, mid-epoch ("step") or at an epoch end
    ("epoch"), by global step; a sweep's pruner reads it while the run trains."""
    p = trainer.position
    return {"global_step": p.global_step, "epoch": p.epoch + 1, "images_seen": p.global_step * trainer.cfg.batch_size,
            "kind": kind, "test_accuracy": result.accuracy, "test_loss": result.loss,
            "test_correct": result.correct, "train_seconds": train_seconds}


# ----------------------------------------------------------------------------- around the loop
def progress_bar(trainer: Trainer) -> tqdm:
    """tqdm on rank 0 when stderr is a terminal (``--no-progress`` turns it off; a disabled bar does
    nothing): the epoch's remaining steps, the loss every ``--log-every`` steps (one host sync each)."""
    cfg, p = trainer.cfg, trainer.position
    shown = trainer.env.is_main and cfg.progress and sys.stderr.isatty()
    return tqdm(total=len(trainer.batches) - p.step_in_epoch, desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
                leave=False, dynamic_ncols=True, disable=not shown)


def watch_ranks(cfg: TrainConfig, env: DistEnv, dumps: Any = None):
    """Under a process group the watchdog (a lost rank is named, stalls are dumped); in one process
    only the stack dumps on SIGUSR2. ``dumps``: already armed, in the run directory agreed on."""
    from .diagnostics.dumps import StackDumps

    if dumps is not None and dumps.out_dir != Path(cfg.out_dir):  # this rank's default name lost
        dumps.close()
        dumps = None
    if env.distributed:
        from .diagnostics.watchdog import Watchdog

        return Watchdog.start(cfg, env, dumps)
    return dumps or StackDumps.start(cfg.out_dir, env.rank)


def make_checkpoints(cfg: TrainConfig, env: DistEnv) -> Checkpoints:
    """The run's checkpoints; for a job across hosts or an elastic restart, ``elastic.py``'s."""
    if env.world_size == env.local_world_size and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return Checkpoints(cfg, env)
    from .elastic import ElasticCheckpoints

    return ElasticCheckpoints(cfg, env)


def check_network(cfg: TrainConfig, env: DistEnv) -> dict[str, Any] | None:
    """The start-up network check under a launcher (all_reduce, bandwidth, interface), logged."""
    if cfg.skip_network_check or not env.distributed:
        return {"skipped": True} if cfg.skip_network_check else None
    from .diagnostics.network import describe, network_check, warnings_of

    network = network_check(env, cfg.dist_timeout)
    log(env, describe(network))
    for warning in warnings_of(network) if env.is_main else []:
        warn(warning)
    return network


def start_observers(cfg: TrainConfig, trainer: Trainer, meta: dict[str, Any], resumed_from: str | None,
                    extra: list[Callback]) -> Callbacks:
    """The observers the flags ask for (none by default), then the launcher's."""
    observers = Callbacks()
    if cfg.wandb:
        from .outputs.tracking import Tracker

        tracker = Tracker.start(cfg, trainer.env, meta, cfg.out_dir, resume_id=trainer.position.tracker_run_id)
        trainer.position.tracker_run_id = tracker.run_id
        observers.add(tracker)
    if cfg.profile:
        from .diagnostics.profile import StepProfiler

        observers.add(StepProfiler(cfg, trainer))
    if cfg.tensorboard and trainer.env.is_main:
        from .outputs.tensorboard import TensorBoard

        purge = trainer.position.global_step + 1 if resumed_from else None
        observers.add(TensorBoard.start(cfg, meta, purge_step=purge))
    for callback in extra:
        observers.add(callback)
    return observers


def run_metadata(trainer: Trainer, resumed_from: str | None, network: dict[str, Any] | None) -> dict[str, Any]:
    """config.json's content. A collective (the hostnames): every rank calls it."""
    cfg, env = trainer.cfg, trainer.env
    return {
        "config": cfg.to_json(), "world_size": env.world_size, "launcher": env.launcher,
        "per_rank_batch": cfg.batch_size // env.world_size, "grad_accum_steps": trainer.grad_accum,
        "micro_batch": cfg.batch_size // env.world_size // trainer.grad_accum,
        "steps_per_epoch": len(trainer.batches), "backend": env.backend, "device": str(env.device),
        "amp": trainer.precision.name, "parameters": count_parameters(trainer.model),
        "torch_version": torch.__version__, "torchvision_version": package_version("torchvision"),
        "cuda_version": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "hostnames": sorted(set(gather_objects(socket.gethostname(), env))),
        "python": sys.version.split()[0], "resumed_from": resumed_from, "network": network,
    }


def package_version(name: str) -> str | None:
    """An installed package's version without importing it (torchvision's import costs ~2 s)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def build_summary(trainer: Trainer, test: EvalResult) -> dict[str, Any]:
    """summary.json: the final exact evaluation, where the run ended, time to target, speed settings."""
    cfg, p, scaler = trainer.cfg, trainer.position, trainer.precision.scaler
    return {
        "test_accuracy": test.accuracy, "test_correct": test.correct, "test_total": test.total,
        "test_loss": test.loss, "world_size": trainer.env.world_size, "launcher": trainer.env.launcher,
        "world_sizes": p.world_sizes,  # every world size the run went through (elastic restarts)
        "restarts": p.restarts,  # each elastic restart: the checkpoint, the steps resumed at, reached and lost
        "grad_accum_steps": trainer.grad_accum, "epochs": p.epoch, "global_step": p.global_step,
        "model": cfg.model, "recipe": cfg.recipe, "per_class_accuracy": test.class_accuracy,
        "per_class_correct": test.class_correct, "per_class_total": test.class_total,
        **trainer.clock.summary(),
        "amp": trainer.precision.name, "grad_scaler_enabled": scaler.is_enabled(),
        "grad_scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
        "compile": cfg.compile, "compile_mode": cfg.compile_mode if cfg.compile else None,
        "channels_last": cfg.channels_last, "sync_batchnorm": uses_sync_batchnorm(trainer.model),
    }
