"""The search space: a TOML file with one table per training flag.

    [lr]                      # a float flag: a range, here on a log scale
    low = 1e-3
    high = 3e-2
    log = true

    [batch-size]              # an int flag: a range with a step ...
    low = 128
    high = 512
    step = 128

    [optimizer]               # ... or any flag: a list of choices
    choices = ["adam", "adamw"]

The flag's type (from TrainConfig) decides int vs float ranges and checks the choices. Flags that
locate a run (out_dir, resume, data_dir), tracking flags and the pair ``betas`` cannot be swept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import flag_name
from ..config_file import FIELD_TYPES, check_type, expected, toml_module
from ..errors import UserError

NOT_SWEPT = {"out_dir": "the sweep gives every trial its own run directory",
             "resume": "the sweep resumes interrupted trials itself",
             "data_dir": "pass it as a fixed flag",
             "betas": "a pair; sweep it with choices in separate runs or fix it",
             "download": "not a hyper-parameter", "progress": "not a hyper-parameter"}
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclasses.dataclass(frozen=True)
class Param:
    name: str  # TrainConfig field name
    kind: str  # "int" | "float" | "choices"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    def suggest(self, trial: Any) -> Any:
        """The trial's value (optuna: suggest_int / suggest_float / suggest_categorical)."""
        if self.kind == "choices":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> dict[str, Any]:
        if self.kind == "choices":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def check(self, value: Any) -> tuple[Any, str | None]:
        """(the value as the trial gets it, None) or (None, what is wrong) for a value given to this
        parameter (--enqueue): of the flag's type, and one of the choices if it has choices; a range
        value may lie outside the range."""
        checked, problem = check_type(self.name, value)
        if problem:
            return None, problem
        if self.kind == "choices" and checked not in self.choices:
            return None, f"{self.name} ({value!r} is not one of the choices {list(self.choices)!r})"
        return checked, None


def parse_param(name: str, spec: Any) -> Param:
    field = name.replace("-", "_")
    if field not in FIELD_TYPES:
        raise UserError(f"--space: unknown flag {name!r} (not a training flag; see `python train_ddp.py --help`)")
    if field in NOT_SWEPT:
        raise UserError(f"--space: {name!r} cannot be swept: {NOT_SWEPT[field]}")
    if field.startswith("wandb"):
        raise UserError(f"--space: {name!r} cannot be swept: a tracking flag, not a hyper-parameter")
    kind = FIELD_TYPES[field]
    if not isinstance(spec, dict):
        raise UserError(f"--space: [{name}] must be a table with low/high (and log, step) or choices, got {spec!r}")
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        choices = spec["choices"]
        if extra:
            raise UserError(f"--space: [{name}] has choices and {', '.join(sorted(extra))}: use one or the other")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"--space: [{name}] choices must be a non-empty list")
        checked = [check_type(field, c) for c in choices]
        bad = [c for c, (_, problem) in zip(choices, checked) if problem]
        if bad:
            raise UserError(f"--space: [{name}] choices must be {expected(field)} values, got {bad!r}")
        return Param(field, "choices", choices=tuple(value for value, _ in checked))
    unknown = set(spec) - RANGE_KEYS
    if unknown:
        raise UserError(f"--space: [{name}] has unknown keys {', '.join(sorted(unknown))} "
                        f"(use low, high, log, step or choices)")
    if kind not in ("int", "float"):
        raise UserError(f"--space: [{name}] is a {kind} flag: give choices = [...], not a range")
    if "low" not in spec or "high" not in spec:
        raise UserError(f"--space: [{name}] needs low and high (or choices)")
    bounds = {"low": spec["low"], "high": spec["high"], "step": spec.get("step")}
    for key, value in bounds.items():
        if value is not None:
            bounds[key], problem = check_type(field, value)
            if problem:
                raise UserError(f"--space: [{name}] {key} must be {'an int' if kind == 'int' else 'a finite number'}, "
                                f"got {value!r}")
    low, high, step, log = bounds["low"], bounds["high"], bounds["step"], spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"--space: [{name}] log must be true or false, got {log!r}")
    if not low < high:
        raise UserError(f"--space: [{name}] needs low < high, got low={low} high={high}")
    if log and not low > 0:
        raise UserError(f"--space: [{name}] a log scale needs low > 0, got {low}")
    if log and step is not None:
        raise UserError(f"--space: [{name}] takes log or step, not both")
    if step is not None and not step > 0:
        raise UserError(f"--space: [{name}] step must be positive, got {step}")
    return Param(field, kind, low=low, high=high, log=log, step=step)  # floats for a float flag (check_type)


def read_toml(path: str | Path, option: str) -> dict[str, Any]:
    """The TOML file an option names (--space, --enqueue); a missing, unreadable or invalid file is
    one error line that names the option and the file."""
    toml = toml_module()
    try:
        return toml.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{option} {path}: cannot read it: {exc}") from None
    except toml.TOMLDecodeError as exc:
        raise UserError(f"{option} {path}: not valid TOML: {exc}") from None


def load_space(path: str | Path) -> list[Param]:
    path = Path(path)
    data = read_toml(path, "--space")
    if not data:
        raise UserError(f"--space {path}: the space is empty: add a table per flag to sweep, e.g. "
                        f"[lr] low = 1e-3 high = 3e-2 log = true")
    params = [parse_param(name, spec) for name, spec in data.items()]
    names = [p.name for p in params]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"--space {path}: {', '.join(dupes)} given twice (as a-b and a_b)")
    return params


def flag_args(name: str, value: Any) -> list[str]:
    """A training flag with a value, as command-line arguments (bools as --x / --no-x)."""
    flag = flag_name(name)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, repr(value) if isinstance(value, float) else str(value)]
