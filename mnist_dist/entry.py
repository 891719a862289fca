"""One training run's entry, shared by ``train_ddp.py`` and ``mnist-dist train``: parse -> validate ->
set up -> fit -> tear down (``run_training``), and the exit codes (``guarded``).

The train flags are generated from ``TrainConfig`` (one flag per field, its help from the field);
``validate`` runs each feature's checks before any process group exists. ``guarded`` turns a
UserError into one ``error: ...`` line and exit code 2, a stop signal into exit code 3, a lost rank
into its report and exit code 4. The other commands (``cli.py``) are not imported by a training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import sys
from typing import Any, Callable, Sequence

from .config import RECIPES, TrainConfig, check_fields, flag_name, resolve_config
from .console import rank_prefix, warn
from .errors import EXIT_RANK_FAILURE, EXIT_STOPPED, EXIT_USER_ERROR, RankFailure, StopTraining, UserError

# the other commands of ``mnist-dist`` (cli.COMMANDS), named in the train help
OTHER_COMMANDS = ("evaluate", "download", "plot", "predict", "export", "doctor", "ray", "sweep", "checkpoint")

# fields whose flag differs from --field-name or that need special handling
_NEGATIVE_FLAGS = {"download": "--no-download", "progress": "--no-progress"}


def build_train_parser(prog: str = "mnist-dist train") -> argparse.ArgumentParser:
    from .models import MODELS

    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a CNN on MNIST, plain or with DistributedDataParallel. Launch with python "
            "(one process) or torchrun (any number of processes and nodes). Other commands "
            f"(`mnist-dist COMMAND --help`): {', '.join(OTHER_COMMANDS)}."
        ),
    )
    from_recipe = {key for recipe in RECIPES.values() for key in recipe}
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        if f.name in _NEGATIVE_FLAGS:
            parser.add_argument(_NEGATIVE_FLAGS[f.name], dest=f.name, action="store_const",
                                const=False, default=None, help=f"turn off: {help_text}")
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=help_text)
        if f.name == "recipe":
            kwargs["help"] = f"{help_text}; one of: {', '.join(sorted(RECIPES))} (default: fast)"
        elif f.name == "model":
            kwargs["help"] = f"{help_text}; one of: {', '.join(sorted(MODELS))} (default: from the recipe)"
        if "default" not in kwargs["help"] and f.type not in ("bool", bool):
            shown = "from the recipe" if f.name in from_recipe else f.default if f.default != "" else "empty"
            kwargs["help"] += f" (default: {shown})".replace("%", "%%")
        if f.type in ("bool", bool):
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif f.name == "betas":
            kwargs.update(type=float, nargs=2, metavar=("B1", "B2"))
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}.get(str(f.type), str)
        parser.add_argument(flag_name(f.name), **kwargs)
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="training flags from a TOML, YAML or JSON file (keys = flag names; a run's config.json "
             "works too); flags given explicitly win")
    return parser


def parse_train_args(argv: Sequence[str] | None, world_size: int | None = None) -> TrainConfig:
    """Flags → resolved, validated config (before any process group exists)."""
    from .data.mnist import resolve_data_dir
    from .dist import launcher_world
    from .outputs.rundir import default_run_dir

    args = build_train_parser().parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    world = world_size if world_size is not None else launcher_world()[2]
    from_file: dict[str, Any] = {}
    if args.config:
        from .config_file import load_config_file

        from_file, run_info = load_config_file(args.config)
        if run_info.get("world_size") not in (None, world) and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {args.config} was written by a run at world size {run_info['world_size']}; "
                  f"this run has world size {world}, so its results may differ", file=sys.stderr, flush=True)
    values = {**from_file, **explicit}  # explicit flags win over the file
    cfg = resolve_config(values.pop("recipe", "fast"), values)
    cfg.data_dir = resolve_data_dir(values.get("data_dir"))
    if cfg.resume == "auto" and not cfg.out_dir:
        raise UserError("--resume auto needs --out-dir: the run directory whose checkpoints to resume")
    cfg.out_dir = cfg.out_dir or default_run_dir()
    validate(cfg, world)
    return cfg


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Every check that needs no process group, each feature its own; one UserError line."""
    from .engines import check_engine
    from .models import check_model

    check_model(cfg.model)
    check_fields(cfg, world_size)
    check_engine(cfg.engine)
    if cfg.async_checkpoint and cfg.checkpoint_format != "dcp":
        raise UserError("--async-checkpoint needs --checkpoint-format dcp (the full format is one file rank 0 writes)")
    if cfg.wandb or cfg.wandb_mode:
        from .outputs.tracking import validate_tracking  # --wandb-* and the package they need

        validate_tracking(cfg)
    if cfg.profile or cfg.profile_steps != "5,5,10":
        from .diagnostics.profile import profile_window

        profile_window(cfg.profile_steps)
    if cfg.tensorboard:
        from .console import require

        require("tensorboard", "--tensorboard", extra="tensorboard")


def setup_engine(cfg: TrainConfig):
    """The engine of ``--engine`` (``mnist_dist/engines/<name>.py``), set up: process group, device,
    precision. Under a launcher torch's Flight Recorder is switched on first, dumping into debug/."""
    from .dist import launched_by_torchrun
    from .engines import engine_class

    if launched_by_torchrun():
        from .diagnostics import flight

        flight.prepare(cfg.out_dir)  # before any process group
    return engine_class(cfg.engine).setup(cfg)


def run_training(argv: Sequence[str]) -> int:
    """parse -> validate -> set up the engine -> fit -> tear down (also on error). From the first line
    after parsing, SIGUSR2 dumps the stacks and SIGTERM/SIGINT end the start-up at once (exit 3)."""
    from .diagnostics.dumps import StackDumps
    from .dist import launcher_world
    from .stopping import StartupStop
    from .train import fit

    cfg = parse_train_args(argv)
    dumps = StackDumps.start(cfg.out_dir, launcher_world()[0])
    startup = StartupStop.install([lambda: mark_stopped(StopTraining(0, None)), dumps.close])
    try:
        engine = setup_engine(cfg)
        try:
            fit(cfg, engine, dumps=dumps, startup=startup)  # ends with the ranks' last barrier
        finally:
            engine.teardown()
    finally:
        startup.end()
        dumps.close()
    return 0


def record(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torchrun's ``@record``: a failing rank's traceback goes to the error file torchrun reports with
    its rank. Imported only when torchrun asked for it (``TORCHELASTIC_ERROR_FILE``), so a plain run
    and the light subcommands (plot, predict) do not pay for torch.distributed.elastic's imports."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            from torch.distributed.elastic.multiprocessing.errors import record as elastic_record

            return elastic_record(fn, atomic_error_handler())(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def atomic_error_handler():
    """torch's error handler, writing the error file under a temporary name renamed when complete:
    when ranks fail together, torchrun stops the others (SIGTERM) and then reads every failed rank's
    file; one cut short mid-write made its agent crash with a JSONDecodeError instead of naming the
    failed rank (seen under load)."""
    import json
    import time
    import traceback

    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    class AtomicErrorHandler(ErrorHandler):
        def record_exception(self, e: BaseException) -> None:
            path = self._get_error_file_path()
            if not path:
                return super().record_exception(e)
            data = {"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": {
                "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, path)

    return AtomicErrorHandler()


def mark_stopped(stop: StopTraining) -> None:
    """Under a launcher exit code 3 is lost (torchrun exits 1 when a rank fails): a launcher that needs
    to know that the ranks stopped on a signal with a checkpoint (slurm/train.sbatch, to requeue) sets
    $MNIST_DIST_STOP_FILE: every rank that stops creates it, and rank 0 (the only one that knows the
    path: it alone writes checkpoints) writes the checkpoint's path into it; the others only create it,
    so they cannot blank the path whichever rank comes last."""
    path = os.environ.get("MNIST_DIST_STOP_FILE")
    if path:
        try:
            with open(path, "w" if stop.checkpoint else "a") as fh:
                if stop.checkpoint:
                    fh.write(f"{stop.checkpoint}\n")
        except OSError as exc:
            warn(f"cannot write $MNIST_DIST_STOP_FILE {path}: {exc.strerror}")


def guarded(func: Callable[[], int | None]) -> int:
    """Run a command; a UserError becomes one readable line and exit code 2."""
    try:
        return func() or 0
    except UserError as exc:
        print(f"{rank_prefix()}error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except StopTraining as stop:
        mark_stopped(stop)
        return EXIT_STOPPED  # rank 0 already logged where the checkpoint is
    except RankFailure as exc:  # a collective failed: the report (diagnostics/watchdog.py), one line each
        for i, line in enumerate(str(exc).splitlines()):
            print(f"{rank_prefix()}{'error: ' if i == 0 else '  '}{line}", file=sys.stderr, flush=True)
        return EXIT_RANK_FAILURE
    except OSError as exc:  # a full disk, an unwritable or vanished file: name the file and the cause
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{rank_prefix()}error: {where}{exc.strerror or exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{rank_prefix()}interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        # The command is over (files written and closed, process group destroyed): spare the
        # interpreter's final garbage collection over torch's ~10^5 objects (~0.7 s of every exit here).
        gc.freeze()
