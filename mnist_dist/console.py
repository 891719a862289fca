"""What the job prints: rank 0's lines, one-line notices and warnings (prefixed with the rank under a
launcher), and the check that an optional package is installed."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from .errors import UserError


def rank_prefix() -> str:
    """``[rank N] `` under a launcher with more than one rank, else nothing."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '0')}] " if world not in ("", "1") else ""


def log(env: Any, message: str) -> None:
    """A progress line on stdout, from global rank 0 only."""
    if env.is_main:
        print(message, flush=True)


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"{rank_prefix()}warning: {message}", file=sys.stderr, flush=True)


def require(package: str, flag: str, extra: str = "track") -> None:
    """A clear error when ``flag`` needs an optional package that is not installed."""
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{flag} needs the Python package {package!r}, which is not installed; "
                        f"install it with `pip install 'mnist-dist[{extra}]'` (or `pip install {package}`)")
