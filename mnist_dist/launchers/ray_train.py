"""``python -m mnist_dist ray --num-workers N [...] [train flags]``: the same training under Ray Train.

Ray starts the N worker processes and creates their process group (``ray.train.torch.TorchTrainer``:
gloo on CPUs, nccl with ``--use-gpu``). Each worker builds our ``DistEnv`` from Ray's train context
(``dist.adopt``: world/local rank and size, Ray's device) and runs ``train.fit`` with the DDP engine
as it is: same recipes, same exact evaluation, same run directory. Every checkpoint file we write
(``checkpoint.py``) is also reported with ``ray.train.report(metrics, checkpoint=...)``, with the
epoch's record at each epoch end; a worker group that Ray restarts (``--max-failures``) resumes
from ``ray.train.get_checkpoint()`` (or from the run directory's newest checkpoint when that one is
newer: a report Ray had not registered before the failure), bitwise as our own ``--resume`` does.

This process (the driver) checks what it can before Ray starts, so bad input is one ``error:``
line. Ray is imported only here: ``pip install 'mnist-dist[ray]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..callbacks import Callback
from ..config import TrainConfig
from ..errors import UserError

LAUNCHER = "ray"
# environment variables of the driver that the workers see too (Ray workers inherit the
# environment of the node's raylet, not the driver's)
FORWARDED_PREFIXES = ("MNIST_DIST_", "MNIST_DATA_DIR", "WANDB_", "OMP_NUM_THREADS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-dist ray",
        allow_abbrev=False,  # never let an abbreviation swallow a training flag
        description=(
            "Train with Ray Train (TorchTrainer) in N Ray workers, on a local Ray started here or on "
            "an existing cluster (--address). Every other flag is a train_ddp.py flag; flags after "
            "`--` are always training flags (e.g. the DataLoader's own --num-workers)."
        ),
    )
    parser.add_argument("--num-workers", type=int, required=True, metavar="N",
                        help="Ray workers = ranks (ScalingConfig.num_workers)")
    parser.add_argument("--use-gpu", action="store_true",
                        help="one GPU per worker (nccl); without it the workers train on CPUs (gloo)")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (`auto`, or HOST:PORT); default: start a local Ray")
    parser.add_argument("--max-failures", type=int, default=0, metavar="F",
                        help="worker-group restarts Ray may make, each resuming from the last "
                             "checkpoint (FailureConfig.max_failures; -1: no limit)")
    parser.add_argument("--storage", default=None, metavar="DIR",
                        help="RunConfig.storage_path: where Ray keeps the run's checkpoints (shared by "
                             "all nodes on a cluster; default: Ray's, ~/ray_results)")
    parser.add_argument("--name", default=None,
                        help="RunConfig.name (default: the run directory's name); Ray's record of the "
                             "run is STORAGE/NAME")
    parser.add_argument("--wait-for-resources", action="store_true",
                        help="let Ray wait for CPUs/GPUs the cluster does not have yet (an autoscaler "
                             "will add them) instead of failing at once")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the training flags (unknown to us, or anything after ``--``)."""
    argv = list(argv)
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    args, train_argv = build_parser().parse_known_args(argv)
    return args, train_argv + tail


def check_request(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """What the driver can refuse before starting Ray."""
    import torch

    from ..engines._base import resolve_precision

    if args.max_failures < -1:
        raise UserError(f"--max-failures must be -1 (no limit) or >= 0, got {args.max_failures}")
    if cfg.engine != "ddp":
        raise UserError(f"--engine {cfg.engine} cannot run under Ray: Ray creates the process group and "
                        f"the workers use the ddp engine")
    if cfg.checkpoint_format != "full":
        raise UserError("--checkpoint-format dcp cannot run under Ray: Ray's checkpoints are our full-format "
                        "files (report_checkpoint copies one file); use --checkpoint-format full")
    if args.use_gpu and cfg.device == "cpu":
        raise UserError("--use-gpu asks for GPUs but --device cpu for none; drop one of them")
    if not args.use_gpu:
        if cfg.device == "cuda":
            raise UserError("--device cuda under Ray needs --use-gpu (Ray assigns the GPUs)")
        if cfg.backend == "nccl":
            raise UserError("--backend nccl needs --use-gpu; the CPU workers use gloo")
        resolve_precision(cfg.amp, torch.device("cpu"))  # --amp fp16 without GPUs
    if args.use_gpu and args.address is None and not args.wait_for_resources:
        visible = torch.cuda.device_count()
        if visible < args.num_workers:
            raise UserError(f"--use-gpu with --num-workers {args.num_workers} needs {args.num_workers} "
                            f"GPU(s); this machine has {visible} (torch.cuda.device_count())")


def check_cluster(ray: Any, args: argparse.Namespace) -> None:
    """The cluster's resources now against the request (Ray itself would wait for them forever)."""
    if args.wait_for_resources:
        return
    have = ray.cluster_resources()
    need = {"CPU": args.num_workers, **({"GPU": args.num_workers} if args.use_gpu else {})}
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        where = f"the Ray cluster at {args.address}" if args.address else "the local Ray"
        detail = ", ".join(f"{v} {k} (it has {h:g})" for k, (v, h) in short.items())
        raise UserError(f"--num-workers {args.num_workers}{' --use-gpu' if args.use_gpu else ''} needs "
                        f"{detail} on {where}; add nodes, or pass --wait-for-resources if an "
                        f"autoscaler will")


def check_reachable(address: str) -> None:
    """A HOST:PORT that nobody listens on is one error line (Ray itself would retry for ever)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # `auto`, ray://...: Ray's own lookup, which fails by itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise UserError(f"cannot connect to the Ray cluster at --address {address}: "
                        f"{exc.strerror or exc}") from None


def import_ray() -> Any:
    try:
        import ray
        import ray.train  # noqa: F401  (ray without its [train] extra fails here)
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"`mnist-dist ray` needs Ray Train: pip install 'mnist-dist[ray]' "
                        f"(or pip install 'ray[train]'); import failed: {exc}") from None
    return ray


def ray_command(argv: Sequence[str]) -> int:
    from ..entry import parse_train_args
    from ..dist import usable_cpu_count

    args, train_argv = split_argv(argv)
    if args.num_workers < 1:  # before parsing the training flags against that world size
        raise UserError(f"--num-workers must be at least 1, got {args.num_workers}")
    cfg = parse_train_args(train_argv, world_size=args.num_workers)
    check_request(args, cfg)
    # the workers run elsewhere (another cwd, maybe another node): absolute paths
    cfg.out_dir, cfg.data_dir = os.path.abspath(cfg.out_dir), os.path.abspath(cfg.data_dir)
    name = args.name or Path(cfg.out_dir).name
    storage = os.path.abspath(args.storage) if args.storage and "://" not in args.storage else args.storage
    ray = import_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    runtime_env = {
        "env_vars": {**{k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)},
                     "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},  # worker output once, as written
        # this very mnist_dist, shipped with the job: the workers run the driver's code, whether or
        # not (or in whichever version) the cluster's nodes have the package installed
        "py_modules": [str(Path(__file__).resolve().parents[1])],
        # in every process of this job, before Ray's backend creates the process group (see
        # dist.import_before_process_group: otherwise gloo threads outlive destroy_process_group)
        "worker_process_setup_hook": "mnist_dist.dist.import_before_process_group",
    }
    if args.address is None:  # a local Ray for this run; as many CPUs as workers, like torchrun
        ray.init(num_cpus=max(usable_cpu_count(), args.num_workers), include_dashboard=False,
                 runtime_env=runtime_env)
    else:
        check_reachable(args.address)
        try:
            ray.init(address=args.address, runtime_env=runtime_env)
        except (ConnectionError, TimeoutError, ValueError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at --address {args.address}: "
                            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    try:
        check_cluster(ray, args)
        attempts = ray.remote(num_cpus=0)(AttemptCounter).remote()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg, "use_gpu": args.use_gpu, "attempts": attempts},
            scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
            torch_config=TorchConfig(backend=None if cfg.backend == "auto" else cfg.backend,
                                     timeout_s=int(cfg.dist_timeout)),
            run_config=RunConfig(
                name=name, storage_path=storage,
                failure_config=FailureConfig(max_failures=args.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep or None),
            ),
        )
        result = fit_or_explain(trainer, args)
    finally:
        ray.shutdown()
    metrics = {k: (result.metrics or {}).get(k) for k in ("epoch", "global_step", "test_accuracy")}
    print(f"ray: done: Ray's record of the run in {result.path}, last checkpoint "
          f"{result.checkpoint.path if result.checkpoint else None}, metrics {metrics}", flush=True)
    return 0


def fit_or_explain(trainer: Any, args: argparse.Namespace) -> Any:
    """``trainer.fit()``. When the run fails after Ray's retries, a worker's UserError is ours (one
    line, exit 2); any other failure is one line too (exit 1), after Ray's log of it."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        failures = sorted((getattr(exc, "worker_failures", None) or {}).items())
        for rank, error in failures:
            cause = error if isinstance(error, UserError) else getattr(error, "cause", error.__cause__)
            if isinstance(cause, UserError):
                raise UserError(f"rank {rank}: {cause}") from None
        if failures:
            rank, error = failures[0]
            detail = f"rank {rank}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        else:
            detail = " ".join(str(exc).split())
        failed = f"the Ray Train run failed (--max-failures {args.max_failures})"
        raise RayRunFailed(f"{failed}: {detail[:300]}") from None


class RayRunFailed(Exception):
    """The run failed for a reason that is not bad input (exit code 1, one line)."""


class AttemptCounter:
    """A tiny Ray actor: how many times each rank has started, i.e. the worker group's attempt
    (0, then 1 after Ray's first restart, ...). ``faults.py`` reads it as $MNIST_DIST_ATTEMPT."""

    def __init__(self) -> None:
        self.starts: dict[int, int] = {}

    def start(self, rank: int) -> int:
        self.starts[rank] = self.starts.get(rank, 0) + 1
        return self.starts[rank] - 1


# ----------------------------------------------------------------------------- in each Ray worker
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's training function: adopt Ray's process group, resume from Ray's checkpoint, fit."""
    import dataclasses

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from .. import dist, faults
    from ..engines._base import resolve_precision
    from ..engines.ddp import DDPEngine
    from ..train import fit

    cfg: TrainConfig = dataclasses.replace(config["cfg"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    os.environ[faults.ATTEMPT_ENV] = str(ray.get(config["attempts"].start.remote(rank)))
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    env = dist.adopt(rank, context.get_local_rank(), context.get_world_size(),
                     context.get_local_world_size(), device, LAUNCHER, cfg.threads)
    engine = DDPEngine(cfg, env, resolve_precision(cfg.amp, env.device))  # the DDP engine as it is
    with ray_checkpoint_file(ray.train.get_checkpoint()) as resume_file:
        attempt = os.environ[faults.ATTEMPT_ENV]
        # a restart: the run directory may hold a newer checkpoint than Ray registered (one written
        # and reported just before the failure, before Ray's controller polled); rank 0 reads it
        own = newer_own_checkpoint(cfg.out_dir, resume_file) if env.is_main and attempt != "0" else None
        if own is not None:
            cfg.resume = str(own)
            print(f"ray: attempt {attempt}: resuming from {own}, newer than Ray's checkpoint "
                  f"({resume_file or 'none yet'}: Ray had not registered the newest report)", flush=True)
        elif resume_file is not None:
            cfg.resume = resume_file  # Ray's newest checkpoint wins over --resume
            if env.is_main:
                print(f"ray: attempt {attempt}: resuming from Ray's checkpoint {resume_file}", flush=True)
        elif attempt != "0" and env.is_main:  # a restart before the first checkpoint: say so
            print(f"ray: attempt {attempt}: no checkpoint from Ray yet; starting as configured "
                  f"(--resume {cfg.resume or 'none'})", flush=True)
        fit(cfg, engine, callbacks=[RayReport()])
    # the process group is Ray's: its TorchConfig backend destroys it when the workers shut down


@contextlib.contextmanager
def ray_checkpoint_file(checkpoint: Any) -> Iterator[str | None]:
    """The checkpoint file inside a Ray checkpoint, local to this worker while the block runs."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        found = sorted(Path(folder).glob("step-*.pt"))  # one file: report_checkpoint's
        if not found:
            raise UserError(f"Ray checkpoint {checkpoint.path} holds no mnist-dist checkpoint file")
        yield str(found[-1])


def newer_own_checkpoint(out_dir: str, ray_file: str | None) -> Path | None:
    """The run directory's newest loadable checkpoint if its step is past Ray's (None otherwise).
    Both carry our file name, ``step-NNNNNNNN.pt``, so the names order them."""
    from ..checkpoint import newest_loadable

    own = newest_loadable(out_dir)
    if own is None or (ray_file is not None and own.name <= Path(ray_file).name):
        return None
    return own


class RayReport(Callback):
    def on_checkpoint(self, path: str | None, metrics: dict[str, Any]) -> None:
        report_checkpoint(path, metrics)


def report_checkpoint(path: str | None, metrics: dict[str, Any]) -> None:
    """Every rank after each of our checkpoints: rank 0 hands the file to Ray (copied into the run's
    storage before this returns), the others report the metrics only."""
    import ray.train

    if path is None:
        ray.train.report(metrics, checkpoint=None)
        return
    source = Path(path)
    with tempfile.TemporaryDirectory(dir=source.parent, prefix=".ray-report-") as staging:
        linked = Path(staging) / source.name
        try:
            os.link(source, linked)  # same directory, so same file system: no copy
        except OSError:
            import shutil

            shutil.copy2(source, linked)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))


def main(argv: Sequence[str]) -> int:
    try:
        return ray_command(argv)
    except RayRunFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
