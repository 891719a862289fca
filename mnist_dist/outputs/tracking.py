"""Experiment tracking with Weights & Biases, from global rank 0 only.

``Tracker`` is one of the run's observers (``callbacks.py``), made only with ``--wandb``; on ranks
other than global rank 0 it is a no-op (no host sync).

What one run logs: the resolved config (``config.json``'s content), ``batch_loss`` and ``lr`` every
``--wandb-every`` optimizer steps (rank 0's batch loss; one ``.item()`` each time), every
``metrics.jsonl`` record, the final ``summary.json``, the pictures, and the final weights
(``model.pt`` and ``model.pt2``) as a ``model`` artifact. Every point carries ``global_step``, the
x-axis of all charts, so a resumed run (``resume_id``) continues the same curves.

Tracking never stops training: with no API key, mode ``online`` falls back to ``offline`` with one
notice line; a failing ``wandb.init`` (network down) falls back to offline, and a failing
``log`` turns tracking off with one notice line.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..callbacks import Callback
from ..console import notice, require
from ..errors import UserError

WANDB_MODES = ("online", "offline", "disabled")
DEFAULT_PROJECT = "mnist-dist"
INIT_TIMEOUT_S = 60.0  # seconds wandb.init may try to reach the server; $WANDB_INIT_TIMEOUT overrides


def validate_tracking(cfg) -> None:
    """Flag checks that need no process group (called from ``entry.validate``)."""
    if cfg.wandb_mode and cfg.wandb_mode not in WANDB_MODES:
        raise UserError(f"--wandb-mode must be one of {', '.join(WANDB_MODES)}, got {cfg.wandb_mode!r}")
    if cfg.wandb_every <= 0:
        raise UserError(f"--wandb-every must be positive, got {cfg.wandb_every}")
    if cfg.wandb:
        require("wandb", "--wandb")
        env_mode = os.environ.get("WANDB_MODE", "")
        if not cfg.wandb_mode and env_mode and env_mode not in WANDB_MODES + ("dryrun", "run"):
            raise UserError(f"WANDB_MODE={env_mode!r} is not one of {', '.join(WANDB_MODES)}")


def has_api_key() -> bool:
    """An API key (or identity token) in the environment or in netrc for the configured host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(flag: str) -> str:
    """--wandb-mode, else $WANDB_MODE, else online; online without a key becomes offline."""
    mode = flag or os.environ.get("WANDB_MODE", "") or "online"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not one of {', '.join(WANDB_MODES)}")
    if mode == "online" and not has_api_key():
        notice("wandb: no API key configured (WANDB_API_KEY or `wandb login`); logging offline "
               "instead — upload later with `wandb sync`")
        mode = "offline"
    return mode


class Tracker(Callback):
    """A wandb run on global rank 0; every method is a cheap no-op otherwise."""

    def __init__(self, run: Any = None, every: int = 50, run_dir: str | os.PathLike = ".") -> None:
        self.run = run
        self.every = every
        self.run_dir = Path(run_dir)
        self.last_step = 0

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        """The wandb run id (stored in checkpoints so that a resumed job continues this run)."""
        return self.run.id if self.run is not None else None

    @classmethod
    def start(cls, cfg, env, metadata: dict[str, Any], run_dir: str | os.PathLike,
              resume_id: str | None = None) -> "Tracker":
        if not cfg.wandb or not env.is_main:
            return cls()
        mode = resolve_mode(cfg.wandb_mode)
        if mode == "disabled":
            return cls()
        import wandb

        tags = cfg.wandb_tags or os.environ.get("WANDB_TAGS", "")
        kwargs = dict(
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            entity=cfg.wandb_entity or None,
            name=cfg.wandb_name or os.environ.get("WANDB_NAME") or Path(run_dir).name,
            group=cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP") or None,
            tags=[t.strip() for t in tags.split(",") if t.strip()] or None,
            config=metadata,
            dir=str(run_dir),  # wandb/ lives inside the run directory
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        settings = dict(init_timeout=_float_env("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S), console="off", x_disable_stats=True,
                        quiet=True)
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
        except Exception as exc:  # network down, server error, bad entity: never stop training
            if mode != "online":
                notice(f"wandb: could not start a run ({_reason(exc)}); tracking is off")
                return cls()
            notice(f"wandb: online start failed ({_reason(exc)}); logging offline instead")
            try:
                run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **kwargs)
            except Exception as exc2:
                notice(f"wandb: could not start an offline run either ({_reason(exc2)}); tracking is off")
                return cls()
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")
        where = Path(run.dir).parent
        hint = f"; upload later with `wandb sync {where}`" if run.settings.mode == "offline" else ""
        print(f"wandb: run {run.id} ({run.settings.mode}) in {where}{hint}", flush=True)
        return cls(run, cfg.wandb_every, run_dir)

    # ------------------------------------------------------------------ logging
    def _log(self, data: dict[str, Any]) -> None:
        try:
            self.run.log(data)
        except Exception as exc:
            notice(f"wandb: logging failed ({_reason(exc)}); tracking is off for the rest of the run")
            self.run = None

    def on_step(self, global_step: int, loss, optimizer) -> None:
        """Every ``every`` optimizer steps: rank 0's batch loss (one host sync) and the learning rate."""
        if self.run is None or global_step % self.every:
            return
        self.last_step = global_step
        self._log({"global_step": global_step, "batch_loss": float(loss.item()),
                   "lr": float(optimizer.param_groups[0]["lr"])})

    def on_epoch(self, record: dict[str, Any], global_step: int) -> None:
        """One ``metrics.jsonl`` record, under the same key names."""
        if self.run is None:
            return
        self.last_step = global_step
        self._log({**record, "global_step": global_step})

    def on_end(self, summary: dict[str, Any], meta: dict[str, Any]) -> None:
        """The summary, the pictures and the final weights (as a ``model`` artifact); closes the run."""
        self.finish(summary)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        run_dir = self.run_dir
        try:
            import wandb

            self.run.summary.update(summary)
            pictures = {p.stem: wandb.Image(str(p)) for p in map(run_dir.joinpath, PICTURES) if p.is_file()}
            if pictures:
                self.run.log({**pictures, "global_step": self.last_step})
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model",
                                      metadata={k: summary[k] for k in ("test_accuracy", "test_correct",
                                                                        "model", "recipe") if k in summary})
            for name in ("model.pt", "model.pt2", "config.json"):
                if (run_dir / name).is_file():
                    artifact.add_file(str(run_dir / name), name=name)
            self.run.log_artifact(artifact)
        except Exception as exc:
            notice(f"wandb: final logging failed ({_reason(exc)})")
        try:
            self.run.finish()
        except Exception as exc:
            notice(f"wandb: finishing the run failed ({_reason(exc)})")
        self.run = None


PICTURES = ("curves.png", "confusion_matrix.png", "mistakes.png")


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
