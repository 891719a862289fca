"""Command line: ``mnist-dist [train] ...``, ``evaluate``, ``download``.

The train flags are generated from ``TrainConfig`` (one flag per field, its help from the field).
Every command runs inside ``guarded``: a UserError becomes one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

from .config import RECIPES, TrainConfig, resolve_config, validate_config
from .errors import EXIT_STOPPED, EXIT_USER_ERROR, StopTraining, UserError

SUBCOMMANDS = ("train", "evaluate", "download", "plot", "predict", "export")

# fields whose flag differs from --field-name or that need special handling
_NEGATIVE_FLAGS = {"download": "--no-download", "progress": "--no-progress"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_location_args(parser: argparse.ArgumentParser, run_dir: bool, data_dir: bool) -> None:
    """--run-dir / --data-dir, the same for every subcommand that takes them."""
    if run_dir:
        parser.add_argument("--run-dir", required=True, help="run directory written by training")
    if data_dir:
        parser.add_argument("--data-dir", default=None,
                            help="MNIST root (default: $MNIST_DATA_DIR, else ./data)")


def build_train_parser(prog: str = "mnist-dist train") -> argparse.ArgumentParser:
    from .models import MODELS

    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a CNN on MNIST, plain or with DistributedDataParallel. Launch with python "
            "(one process) or torchrun (any number of processes and nodes). Other commands: "
            "`mnist-dist evaluate --run-dir DIR`, `mnist-dist download --data-dir DIR`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        if f.name in _NEGATIVE_FLAGS:
            parser.add_argument(_NEGATIVE_FLAGS[f.name], dest=f.name, action="store_const",
                                const=False, default=None, help=f"turn off: {help_text}")
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=help_text)
        if f.name == "recipe":
            kwargs.update(default="fast", help=f"{help_text}; one of: {', '.join(sorted(RECIPES))}")
        elif f.name == "model":
            kwargs["help"] = f"{help_text}; one of: {', '.join(sorted(MODELS))} (default: from the recipe)"
        elif f.name == "batch_size":
            kwargs["help"] = ("GLOBAL batch size summed over all ranks; each rank takes "
                              "batch-size / world-size, which must divide evenly (default: from the recipe)")
        elif f.name == "data_dir":
            kwargs["help"] = ("torchvision MNIST root (files in DIR/MNIST/raw); default: $MNIST_DATA_DIR, "
                              "else ./data")
        elif f.name == "out_dir":
            kwargs["help"] = "run directory for config/metrics/summary/weights (default: runs/<timestamp>)"
        if f.type in ("bool", bool):
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif f.name == "betas":
            kwargs.update(type=float, nargs=2, metavar=("B1", "B2"))
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}.get(str(f.type), str)
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_train_args(argv: Sequence[str] | None, world_size: int | None = None) -> TrainConfig:
    """Flags → resolved, validated config (before any process group exists)."""
    from .data import resolve_data_dir
    from .dist import launcher_world
    from .outputs import default_run_dir

    args = build_train_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "recipe"}
    cfg = resolve_config(args.recipe, overrides)
    cfg.data_dir = resolve_data_dir(args.data_dir)
    if cfg.resume == "auto" and not cfg.out_dir:
        raise UserError("--resume auto needs --out-dir: the run directory whose checkpoints to resume")
    cfg.out_dir = cfg.out_dir or default_run_dir()
    validate_config(cfg, world_size if world_size is not None else launcher_world()[2])
    return cfg


def setup_engine(cfg: TrainConfig):
    """The DistEnv for ``cfg.engine``: our dist.setup, or one read from accelerate's Accelerator."""
    from . import dist

    if cfg.engine == "accelerate":
        from .engine_accelerate import setup

        return setup(cfg)
    return dist.setup(cfg.backend, cfg.device, cfg.dist_timeout, cfg.threads)


def train_command(argv: Sequence[str]) -> int:
    from . import dist
    from .train import fit

    cfg = parse_train_args(argv)
    env = setup_engine(cfg)
    try:
        fit(cfg, env)
        env.barrier()  # every rank done with its last collective before the group goes away
    finally:
        dist.teardown()
    return 0


def evaluate_command(argv: Sequence[str]) -> int:
    from . import data, dist
    from .metrics import evaluate
    from .outputs import load_run_model
    from .train import resolve_precision

    parser = argparse.ArgumentParser(
        prog="mnist-dist evaluate",
        description="Evaluate a run's final weights on all 10,000 test images (exact at any world "
                    "size; run alone or under torchrun). Prints one JSON line.",
    )
    add_location_args(parser, run_dir=True, data_dir=True)
    parser.add_argument("--batch-size", type=int, default=1000, help="per-rank evaluation batch")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="fail instead of downloading missing MNIST files")
    parser.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default="off", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--dist-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    root = data.resolve_data_dir(args.data_dir)
    env = dist.setup(args.backend, args.device, args.dist_timeout)
    try:
        model, config = load_run_model(args.run_dir, map_location=env.device)
        data.prepare(root, env, args.download)
        images, labels = data.load_split(root, train=False)
        x = data.to_float(images, bool(config.get("normalize", True))).to(env.device)
        result = evaluate(model, x, labels.to(env.device), env, args.batch_size,
                          resolve_precision(args.amp, env.device).autocast())
        if env.is_main:
            print(json.dumps({
                "test_correct": result.correct,
                "test_total": result.total,
                "test_accuracy": result.accuracy,
                "test_loss": result.loss,
                "world_size": env.world_size,
                "run_dir": str(args.run_dir),
            }, sort_keys=True), flush=True)
        env.barrier()
    finally:
        dist.teardown()
    return 0


def download_command(argv: Sequence[str]) -> int:
    from . import data

    parser = argparse.ArgumentParser(
        prog="mnist-dist download",
        description="Only download MNIST (e.g. on a login node with internet), then exit.",
    )
    add_location_args(parser, run_dir=False, data_dir=True)
    args = parser.parse_args(argv)
    root = data.resolve_data_dir(args.data_dir)
    if data.missing_files(root):
        data.download(root)
    data.validate_files(root)
    print(f"MNIST ready in {data.raw_dir(root)}", flush=True)
    return 0


def _run_dir_commands() -> dict[str, Callable[[Sequence[str]], int]]:
    from .predict import export_command, plot_command, predict_command

    return {"plot": plot_command, "predict": predict_command, "export": export_command}


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": train_command,
    "evaluate": evaluate_command,
    "download": download_command,
    **_run_dir_commands(),
}


def rank_prefix() -> str:
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '0')}] " if world not in ("", "1") else ""


def guarded(func: Callable[[], int | None]) -> int:
    """Run a command; a UserError becomes one readable line and exit code 2."""
    try:
        return func() or 0
    except UserError as exc:
        print(f"{rank_prefix()}error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except StopTraining:
        return EXIT_STOPPED  # rank 0 already logged where the checkpoint is
    except KeyboardInterrupt:
        print(f"{rank_prefix()}interrupted", file=sys.stderr, flush=True)
        return 130


def dispatch(argv: Sequence[str]) -> int:
    """``[train] FLAGS`` | ``evaluate FLAGS`` | ``download FLAGS``; train is the default command."""
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return train_command(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``mnist-dist``) and ``python -m mnist_dist``."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return guarded(lambda: record(dispatch)(sys.argv[1:] if argv is None else argv))
