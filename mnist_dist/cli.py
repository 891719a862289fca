"""Command line: ``mnist-dist [train] ...`` and the other commands of ``COMMANDS`` (evaluate, download,
plot, predict, export, doctor, ray, sweep), each imported only when it runs. Training itself is
``entry.run_training`` (also what ``train_ddp.py`` calls); every command runs inside ``entry.guarded``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .entry import guarded, record, run_training


def download_command(argv: Sequence[str]) -> int:
    from .data import mnist as data
    from .tools.arguments import add_location_args

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


def _tool(module: str, function: str, package: str = "tools") -> Callable[[Sequence[str]], int]:
    """A subcommand of ``mnist_dist/tools/`` (or another subpackage), imported only when it runs."""

    def command(argv: Sequence[str]) -> int:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{package}.{module}"), function)(argv)

    return command


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": run_training,
    "evaluate": _tool("evaluate", "evaluate_command"),
    "download": download_command,
    "plot": _tool("predict", "plot_command"),
    "predict": _tool("predict", "predict_command"),
    "export": _tool("predict", "export_command"),
    "doctor": _tool("doctor", "doctor_command"),
    "ray": _tool("ray_train", "main", package="launchers"),  # Ray Train: launchers/ray_train.py
    "sweep": _tool("command", "sweep_command", package="sweep"),  # Optuna: the `sweep` extra
    "checkpoint": _tool("convert", "checkpoint_command"),  # convert between the checkpoint formats
}


def dispatch(argv: Sequence[str]) -> int:
    """``COMMAND FLAGS`` for a command of ``COMMANDS``; train is the default command."""
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return run_training(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``mnist-dist``) and ``python -m mnist_dist``."""
    return guarded(lambda: record(dispatch)(sys.argv[1:] if argv is None else argv))
