"""``mnist-dist sweep``: an Optuna study whose trials are real training runs.

    python -m mnist_dist sweep --space sweeps/example.toml --trials 8 --parallel 2 \\
        --sweep-dir runs/sweep-example [--launcher local|torchrun|slurm] [--nproc K] \\
        [--metric test_accuracy --direction maximize] [train flags, e.g. --max-steps 200 --eval-every 50]

The loop: ask Optuna (TPE) for a trial, start it as a run in ``DIR/trial-NNNN/`` with the fixed flags
plus the trial's values plus ``--out-dir DIR/trial-NNNN --resume auto``; while it trains, feed every
line of its ``evaluations.jsonl`` (every ``--eval-every`` steps and at each epoch end) to the median
pruner and stop the trial if it is pruned; when it ends, tell Optuna the metric from its
``summary.json``. The study lives in ``DIR`` (SQLite, or an Optuna journal file for SLURM), so running
the same command again continues it: finished trials are kept, trials that a SIGTERM/Ctrl-C stopped
(they checkpointed) resume from their checkpoints, and new trials are asked for up to ``--trials``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..config import flag_name
from ..errors import UserError
from ..outputs.rundir import atomic_write_json
from .driver import PRUNABLE, Sweep
from .launchers import LocalLauncher, SlurmLauncher, split_sbatch_args
from .space import Param, load_space, read_toml

STATE_FILE = "sweep.json"
METRICS = ("test_accuracy", "test_loss", "test_correct", "train_seconds", "seconds_to_target", "steps_to_target")
SET_BY_SWEEP = ("out_dir", "resume")
PATH_FLAGS = ("--config", "--data-dir")


class HelpFormatter(argparse.HelpFormatter):
    """Help texts wrapped at spaces only, so that an example such as --sbatch-args=--partition=gpu
    stays whole. Each help text states its default itself (ArgumentDefaultsHelpFormatter printed
    "(default: None)" for the flags whose default depends on others)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-dist sweep",
        description="Hyper-parameter sweep on Optuna (TPE sampler, median pruner): every trial is a real "
                    "training run in DIR/trial-NNNN/. Arguments not listed here are fixed training flags "
                    "given to every trial. Running the same command again continues the sweep.",
        formatter_class=HelpFormatter)
    p.add_argument("--space", required=True, metavar="FILE",
                   help="TOML search space: one table per flag (low/high/log/step or choices)")
    p.add_argument("--trials", type=int, default=20, metavar="N",
                   help="trials in the study in all (earlier runs of the command count); default 20")
    p.add_argument("--parallel", type=int, default=1, metavar="P", help="trials running at the same time; default 1")
    p.add_argument("--sweep-dir", required=True, metavar="DIR",
                   help="the study, its outputs and one run directory per trial, e.g. runs/sweep-NAME")
    p.add_argument("--launcher", choices=("local", "torchrun", "slurm"), default="local",
                   help="local (the default): python subprocesses; torchrun: K ranks per trial; "
                        "slurm: sbatch --array over slurm/train.sbatch")
    p.add_argument("--nproc", type=int, default=None, metavar="K",
                   help="ranks per trial (torchrun: per trial; slurm: per node); default 1")
    p.add_argument("--metric", default="test_accuracy", choices=METRICS,
                   help="summary.json value to optimise; default test_accuracy")
    p.add_argument("--direction", choices=("maximize", "minimize"), default=None,
                   help="default: maximize for test_accuracy and test_correct, else minimize")
    p.add_argument("--study-name", default=None, help="default: the sweep directory's name")
    p.add_argument("--sampler-seed", type=int, default=0, metavar="SEED", help="seed of the TPE sampler; default 0")
    p.add_argument("--prune-startup", type=int, default=5, metavar="S",
                   help="completed trials before pruning starts; default 5")
    p.add_argument("--prune-warmup", type=int, default=0, metavar="IMAGES",
                   help="training images a trial sees before it can be pruned (the pruner's steps are images "
                        "seen, global step x global batch, so trials of different batch sizes compare); default 0")
    p.add_argument("--no-prune", action="store_true", help="never prune")
    p.add_argument("--enqueue", default=None, metavar="FILE",
                   help="TOML file of [[trial]] tables: values a new study tries first (e.g. the current "
                        "recipe); a range's value may lie outside it, a choice must be one of the choices")
    p.add_argument("--sbatch-args", default="", metavar="OPTIONS",
                   help="extra sbatch options for --launcher slurm, given with '=' (a separate value that "
                        "starts with -- is taken for a flag), e.g. --sbatch-args=--partition=gpu")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between looks at the running trials; default 1")
    p.add_argument("--stop-timeout", type=float, default=180.0, metavar="SECONDS",
                   help="seconds the trials get to checkpoint after a stop signal; default 180")
    return p


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("the sweep command needs Optuna: pip install -e '.[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def absolute_paths(argv: list[str]) -> list[str]:
    """--config / --data-dir values made absolute: trials may run elsewhere (a SLURM job cds to the repo)."""
    out = list(argv)
    for i, arg in enumerate(out):
        for flag in PATH_FLAGS:
            if arg == flag and i + 1 < len(out):
                out[i + 1] = os.path.abspath(out[i + 1])
            elif arg.startswith(flag + "="):
                out[i] = f"{flag}={os.path.abspath(arg[len(flag) + 1:])}"
    return out


def check_train_flags(fixed: list[str], params: list[Param], world: int) -> Any:
    """The fixed flags parse and validate (as every trial will); none is swept or set by the sweep."""
    from ..entry import build_train_parser, parse_train_args

    explicit = {k for k, v in vars(build_train_parser().parse_args(fixed)).items() if v is not None}
    for name in SET_BY_SWEEP:
        if name in explicit:
            raise UserError(f"{flag_name(name)} is set by the sweep for every trial (DIR/trial-NNNN, --resume auto)")
    both = sorted(p.flag for p in params if p.name in explicit)
    if both:
        raise UserError(f"{', '.join(both)} is both a fixed flag and in the --space; drop one")
    return parse_train_args([*fixed, "--out-dir", "unused"], world_size=world)


def read_enqueue(path: str | None, params: list[Param]) -> list[dict[str, Any]]:
    """The trials of the --enqueue file, each value checked against the space (as Optuna would only
    once the study exists)."""
    if not path:
        return []
    data = read_toml(path, "--enqueue")
    trials = data.get("trial", [])
    other = sorted(set(data) - {"trial"})
    if other or not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
        found = f"top-level keys {', '.join(other)}" if other else f"trial = {trials!r}"
        raise UserError(f"--enqueue {path}: expected only [[trial]] tables (one per trial, flag = value), "
                        f"found {found}")
    by_name = {p.name: p for p in params}
    out = []
    for i, given in enumerate(trials):
        where = f"--enqueue {path}: trial {i + 1}"
        values: dict[str, Any] = {}
        for key, value in given.items():
            name = str(key).replace("-", "_")
            if name not in by_name:
                raise UserError(f"{where}: {key} is not in the --space")
            if name in values:
                raise UserError(f"{where}: {name} given twice (as a-b and a_b)")
            values[name], problem = by_name[name].check(value)
            if problem:
                raise UserError(f"{where}: {problem}")
        out.append(values)
    return out


def plan_resources(args: argparse.Namespace, cfg: Any) -> tuple[int | None, int]:
    """(threads per rank or None, GPUs per trial); errors when --parallel x --nproc oversubscribes."""
    if args.launcher == "slurm":
        return None, 0  # the scheduler places and sizes the tasks
    k = args.nproc
    use_cuda = cfg.device != "cpu" and _cuda_count() > 0
    if use_cuda:
        if args.parallel * k > _cuda_count():
            raise UserError(f"--parallel {args.parallel} x --nproc {k} = {args.parallel * k} GPUs, "
                            f"but {_cuda_count()} are visible")
        return None, k
    from ..dist import usable_cpu_count  # imports torch: not for the checks before

    cores = usable_cpu_count()
    if args.parallel * k > cores:
        raise UserError(f"--parallel {args.parallel} x --nproc {k} = {args.parallel * k} processes, "
                        f"but only {cores} CPU cores are usable: lower --parallel")
    return (None if cfg.threads else max(1, cores // (args.parallel * k))), 0


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def sweep_command(argv: Sequence[str]) -> int:
    args, fixed = build_parser().parse_known_args(list(argv))
    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    if args.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {args.parallel}")
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc not in (None, 1) and args.launcher == "local":
        raise UserError("--nproc > 1 needs --launcher torchrun or slurm (local runs one process per trial)")
    args.nproc = args.nproc or 1
    if not (0 < args.poll < math.inf and 0 < args.stop_timeout < math.inf):  # NaN fails too
        raise UserError(f"--poll and --stop-timeout must be positive numbers of seconds, got "
                        f"{args.poll} and {args.stop_timeout}")
    if args.prune_startup < 0 or args.prune_warmup < 0:
        raise UserError("--prune-startup and --prune-warmup must be >= 0")
    args.direction = args.direction or ("maximize" if args.metric in ("test_accuracy", "test_correct") else "minimize")
    params = load_space(args.space)
    fixed = absolute_paths(fixed)
    cfg = check_train_flags(fixed, params, world=args.nproc)
    enqueued = read_enqueue(args.enqueue, params)
    split_sbatch_args(args.sbatch_args)  # the SLURM launcher splits them again; an unclosed quote fails now
    threads, gpus_per_trial = plan_resources(args, cfg)
    optuna = import_optuna()
    sweep_dir = make_sweep_dir(args.sweep_dir)
    name = args.study_name or sweep_dir.name
    given = list(fixed)  # what the study is started with (the additions below depend on --parallel)
    if cfg.wandb and not cfg.wandb_group:
        fixed += ["--wandb-group", f"sweep-{name}"]  # all trials in one wandb group
    if threads:
        fixed += ["--threads", str(threads)]

    from filelock import FileLock, Timeout

    lock = FileLock(str(sweep_dir / ".sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another sweep is running on {sweep_dir} (it holds {sweep_dir / '.sweep.lock'})") from None
    except OSError as exc:
        raise UserError(f"--sweep-dir {sweep_dir}: cannot create its lock file: {exc.strerror or exc}") from None
    try:
        study = open_study(optuna, args, params, given, sweep_dir, name)
        if not study.get_trials(deepcopy=False):  # a new study: its first trials (kept in the storage)
            for values in enqueued:
                study.enqueue_trial(values)
        launcher: Any = (SlurmLauncher(sweep_dir, name, args.nproc, args.sbatch_args) if args.launcher == "slurm"
                         else LocalLauncher(args.nproc, args.launcher == "torchrun", threads, gpus_per_trial))
        return Sweep(optuna, study, launcher, args, params, fixed, sweep_dir).run()
    finally:
        lock.release()


def make_sweep_dir(path: str) -> Path:
    """--sweep-dir, created if needed, as an absolute path; one error line when it cannot be."""
    sweep_dir = Path(path).resolve()
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--sweep-dir {sweep_dir}: exists and is not a directory") from None
    except OSError as exc:  # a parent is a file (ENOTDIR), permission denied, read-only file system ...
        raise UserError(f"--sweep-dir {sweep_dir}: cannot create it: {exc.strerror or exc}") from None
    if not os.access(sweep_dir, os.W_OK | os.X_OK):
        raise UserError(f"--sweep-dir {sweep_dir}: not writable (permission denied)")
    return sweep_dir


def read_state(path: Path) -> dict[str, Any]:
    """DIR/sweep.json, what the sweep in DIR was started with; one error line when it is not that."""
    fix = "restore it from the command that started the sweep, or use a new --sweep-dir"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}; {fix}") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a JSON object (the sweep's settings), got {type(state).__name__}; {fix}")
    return state


def open_study(optuna: Any, args: argparse.Namespace, params: list[Param], fixed: list[str], sweep_dir: Path,
               name: str) -> Any:
    """Create the study, or load it when the same sweep was started before in this directory."""
    state = {"study_name": name, "space": {p.name: p.describe() for p in params}, "fixed_flags": fixed,
             "metric": args.metric, "direction": args.direction,
             "storage": "study.journal" if args.launcher == "slurm" else "study.db"}
    path = sweep_dir / STATE_FILE
    if path.exists():
        before = read_state(path)
        differ = sorted(k for k in state if before.get(k) != state[k])
        if differ:
            raise UserError(f"{sweep_dir} holds a sweep with a different {', '.join(differ)}; run the same command "
                            f"to continue it, or use a new --sweep-dir")
    else:
        atomic_write_json(path, {**state, "launcher": args.launcher})
    if args.launcher == "slurm":  # many writers on a shared file system: a journal file, not SQLite
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage: Any = JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    else:
        storage = f"sqlite:///{sweep_dir / 'study.db'}"
    pruner = (optuna.pruners.NopPruner() if args.no_prune or args.metric not in PRUNABLE else
              optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup, n_warmup_steps=args.prune_warmup))
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=args.direction,
                                pruner=pruner)
    # seeded by the trials so far: a resumed study's sampler seeded as at the start would draw its
    # first random trials again
    study.sampler = optuna.samplers.TPESampler(seed=args.sampler_seed + len(study.get_trials(deepcopy=False)))
    return study
