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


def _check_type(name: str, value: Any) -> tuple[Any, str | None]:
    """(the value in the field's type, None) or (None, what is wrong)."""
    kind = FIELD_TYPES[name]
    if name == "betas":
        if (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return (float(value[0]), float(value[1])), None
        return None, f"{name} (expected two numbers, got {value!r})"
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    return (value, None) if ok else (None, f"{name} (expected {kind}, got {type(value).__name__} {value!r})")


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
        checked, problem = _check_type(key, value)
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
