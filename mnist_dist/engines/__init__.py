"""Engines: who owns the process group, the device, the model wrapper and mixed precision.

Each engine is one module in this folder that defines ``ENGINE``, a subclass of ``_base.Engine``;
``--engine NAME`` picks the module by its file name, so adding an engine is adding one file. Modules
whose names start with ``_`` are not engines.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..errors import UserError

DEFAULT = "ddp"


def engine_names() -> tuple[str, ...]:
    """The engines available, by module name (found without importing them); the default first."""
    names = (m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))
    return tuple(sorted(names, key=lambda name: (name != DEFAULT, name)))


def check_engine(name: str) -> None:
    if name not in engine_names():
        raise UserError(f"--engine must be one of {', '.join(engine_names())}, got {name!r}")


def engine_class(name: str):
    """The ``Engine`` subclass of ``--engine NAME`` (imports its module, and only that one)."""
    check_engine(name)
    return importlib.import_module(f"{__name__}.{name}").ENGINE
