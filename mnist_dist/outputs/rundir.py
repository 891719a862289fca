"""The run directory: the files other tools read. Written by global rank 0 only.

    config.json      resolved config, world size, versions, hostnames
    metrics.jsonl    one JSON object per epoch
    evaluations.jsonl one JSON object per exact test evaluation (every --eval-every steps and each epoch end)
    summary.json     final accuracy, counts, per-class accuracy, world size, train seconds
    model.pt         final weights: a plain state_dict (no ``module.`` / ``_orig_mod.`` prefixes)
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import UserError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "model.pt"


def default_run_dir() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / stamp
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return str(candidate)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` for the caller to write; then fsync it, rename it to ``path``
    and fsync the directory, so that readers never see a partial file and a crash leaves the old file
    or the new one, never a partial file under the final name. The name keeps ``path``'s suffix
    (matplotlib and torch.export choose the format by it). On an error the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except OSError as exc:  # name the file meant, not its temporary name
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class RunDir:
    """Writes a run directory; every method is a no-op on ranks other than 0."""

    def __init__(self, path: str | os.PathLike, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled
        self.owner: Any = None  # owner.Owner: rank 0's claim on the directory

    @classmethod
    def open(cls, cfg: Any, env: Any) -> "RunDir":
        """Rank 0 creates ``--out-dir`` and claims it for the run's life (``owner.py``: one run per
        directory; a non-empty one only with --resume or --overwrite); every rank gets the same answer
        or the same error. A collective; ``close`` gives the claim up."""
        from ..dist import broadcast_object
        from .owner import RESTART_WAIT, Owner, check_unused

        run, error = cls(cfg.out_dir, enabled=env.is_main), None
        if env.is_main:
            try:
                run.path.mkdir(parents=True, exist_ok=True)
                run.owner = Owner.claim(cfg.out_dir, wait=RESTART_WAIT if cfg.resume == "auto" else 0)
                if not cfg.resume:
                    check_unused(cfg.out_dir, cfg.overwrite)
            except UserError as exc:
                run.close()
                error = str(exc)
            except OSError as exc:  # the claim is the first file written: an unwritable directory
                error = f"cannot write to --out-dir {run.path}: {exc.strerror or exc}"
        error = broadcast_object(error, env)
        if error:
            raise UserError(error)
        return run

    def close(self) -> None:
        if self.owner is not None:
            self.owner.release()
            self.owner = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write_config(self, config: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.path / CONFIG_FILE, config)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path / name, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._append(METRICS_FILE, record)

    def append_evaluation(self, record: dict[str, Any]) -> None:
        self._append(EVALUATIONS_FILE, record)

    def _truncate(self, name: str, key: str, last: int) -> None:
        """Drop records whose ``key`` is after ``last`` (a resume redoes them), atomically. A line
        that does not parse (the torn last line of a crash mid-write) is dropped with a warning."""
        path = self.path / name
        if not self.enabled or not path.is_file():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record = None
                print(f"warning: {path}: dropping an unreadable line (a write cut short by a crash?): "
                      f"{line[:80]!r}", file=sys.stderr, flush=True)
            if isinstance(record, dict) and record.get(key, 0) <= last:
                kept.append(line)
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def truncate_to(self, epoch: int, global_step: int) -> None:
        """A resume redoes what came after its checkpoint: the epochs after ``epoch`` (1-based records of
        the finished epochs) and the evaluations after ``global_step`` are dropped."""
        self._truncate(METRICS_FILE, "epoch", epoch)
        self._truncate(EVALUATIONS_FILE, "global_step", global_step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.path / SUMMARY_FILE, summary)

    def save_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """``weights``: the engine's ``model_state`` (gathered on every rank before the last barrier)."""
        if not self.enabled:
            return
        import torch

        state = {k: v.detach().cpu() for k, v in weights.items()}
        buffer = io.BytesIO()  # serialised first: a full disk is then an OSError naming the file
        torch.save(state, buffer)
        atomic_write_bytes(self.path / WEIGHTS_FILE, buffer.getvalue())


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: not a run directory written by mnist-dist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise UserError(f"{path} has no 'config' object: not a run directory written by mnist-dist")
    return data


def load_run_model(run_dir: str | os.PathLike, map_location: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's model with its final weights loaded, plus the run's resolved config."""
    import torch

    from ..models import MODELS, build_model, clean_state_dict

    config = read_run_config(run_dir)["config"]
    name = config.get("model")
    if name not in MODELS:
        raise UserError(f"run directory {run_dir} names unknown model {name!r}")
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"weights file {path} is missing (did the run finish?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"weights file {path} is corrupt or unreadable: {reason}") from None
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    model = build_model(name)
    try:
        model.load_state_dict(clean_state_dict(state), strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"weights file {path} does not match model {name!r}: {detail}") from None
    return model.to(map_location), config
