"""``--config FILE``: training flags from a TOML, YAML or JSON file.

The file is a flat mapping of TrainConfig field names to values (``lr = 0.02``; ``batch-size`` and
``batch_size`` are both accepted). A run's own ``config.json`` (``{"config": {...}, "world_size": ...}``)
is a valid file too: its ``config`` object is read, without the keys that say *where* the run was
(``out_dir``, ``resume``, ``data_dir``), so the new run gets its own directory and the usual data
lookup. Order, lowest to highest priority: defaults < recipe < file < flags given explicitly.

Every key is checked against TrainConfig's fields and types; all unknown and mistyped keys are named
in one ``error:`` line. Light: tomllib (tomli before Python 3.11) and json, PyYAML only for .yaml/.yml.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import UserError

# keys of a run's config.json that locate that run rather than describe the training
RUN_LOCATION_KEYS = ("out_dir", "resume", "data_dir")
FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def toml_module() -> Any:
    """tomllib (Python >= 3.11), else the tomli package it came from."""
    try:
        import tomllib

        return tomllib
    except ImportError:
        try:
            import tomli

            return tomli
        except ImportError:
            raise UserError("reading TOML needs Python >= 3.11 or the tomli package (pip install tomli)") from None


def read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The file's top-level mapping, by extension: .toml, .yaml/.yml, .json."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise UserError(f"--config {path}: unknown file type {suffix or '(none)'!r}; use .toml, .yaml, .yml or .json")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if suffix == ".toml":
            data: Any = toml_module().loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise UserError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); "
                                f"or use a .toml or .json file") from None
            data = yaml.safe_load(text)
    except UserError:
        raise
    except Exception as exc:  # TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"--config {path}: not valid {suffix[1:].upper()}: {detail}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _is_number(value: Any) -> bool:
    """An int or float that is finite: NaN and infinities pass no numeric check."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def expected(name: str) -> str:
    """What the field ``name`` takes, in words (for error messages)."""
    if name == "betas":
        return "two numbers"
    if name == "grad_accum":  # the flag takes "auto" or a positive integer (config.grad_accum_steps)
        return "'auto' or a positive int"
    return {"float": "finite float"}.get(FIELD_TYPES[name], FIELD_TYPES[name])


def check_type(name: str, value: Any) -> tuple[Any, str | None]:
    """(the value in the field's type, None) or (None, what is wrong: ``NAME (expected ..., got ...)``).
    The one type check of a field's value: --config files and the sweep's --space and --enqueue."""
    kind = FIELD_TYPES[name]
    if name == "betas":
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
        checked: Any = (float(value[0]), float(value[1])) if ok else None
    elif name == "grad_accum":  # a str field, given as "auto", "2" or 2
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        checked = str(value)
    elif kind == "bool":
        ok, checked = isinstance(value, bool), value
    elif kind == "int":
        ok, checked = isinstance(value, int) and not isinstance(value, bool), value
    elif kind == "float":
        ok = _is_number(value)
        checked = float(value) if ok else None
    else:
        ok, checked = isinstance(value, str), value
    if ok:
        return checked, None
    return None, f"{name} (expected {expected(name)}, got {type(value).__name__} {value!r})"


def config_values(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Checked field values from a file's mapping; one UserError names every bad key."""
    values: dict[str, Any] = {}
    unknown: list[str] = []
    mistyped: list[str] = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELD_TYPES:
            unknown.append(str(raw_key))
            continue
        checked, problem = check_type(key, value)
        if problem:
            mistyped.append(problem)
        else:
            values[key] = checked
    problems = []
    if unknown:
        problems.append(f"unknown keys: {', '.join(sorted(unknown))} (not training flags)")
    if mistyped:
        problems.append(f"mistyped keys: {'; '.join(mistyped)}")
    if problems:
        raise UserError(f"--config {source}: {'; '.join(problems)}")
    return values


def load_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(field values, run info). Run info is the rest of a run's config.json (world_size, ...), else {}."""
    source = os.fspath(path)
    data = read_mapping(path)
    info: dict[str, Any] = {}
    if isinstance(data.get("config"), dict):  # a run directory's config.json
        info = {k: v for k, v in data.items() if k != "config"}
        data = {k: v for k, v in data["config"].items() if k not in RUN_LOCATION_KEYS}
    return config_values(data, source), info
