"""Arguments shared by the subcommands that take a run directory and/or the MNIST root."""

from __future__ import annotations

import argparse


def add_location_args(parser: argparse.ArgumentParser, run_dir: bool, data_dir: bool) -> None:
    """--run-dir / --data-dir, the same for every subcommand that takes them."""
    if run_dir:
        parser.add_argument("--run-dir", required=True, help="run directory written by training")
    if data_dir:
        parser.add_argument("--data-dir", default=None,
                            help="MNIST root (default: $MNIST_DATA_DIR, else ./data)")
