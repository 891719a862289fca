"""Engines: who owns the process group, the device, the model wrapper and mixed precision.

Each engine is one module in this folder that defines ``ENGINE``, a subclass of ``base.Engine``;
``--engine NAME`` picks the module by its file name, so adding an engine is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

# modules of this folder that are not engines themselves
HELPERS = frozenset({"base", "prepare"})
DEFAULT = "ddp"


def engine_names() -> tuple[str, ...]:
    """The engines available, by module name (found without importing them); the default first."""
    here = [str(Path(__file__).parent)]
    names = (m.name for m in pkgutil.iter_modules(here) if m.name not in HELPERS)
    return tuple(sorted(names, key=lambda name: (name != DEFAULT, name)))


def engine_class(name: str):
    """The ``Engine`` subclass of ``--engine NAME`` (imports its module, and only that one)."""
    if name not in engine_names():
        raise ValueError(f"unknown engine {name!r}")
    return importlib.import_module(f"{__name__}.{name}").ENGINE
