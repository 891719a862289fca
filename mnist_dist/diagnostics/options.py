"""Checks of the diagnostic flags (called from ``config.validate_config``, before any process group)."""

from __future__ import annotations

from ..errors import UserError


def profile_window(text: str) -> tuple[int, int, int]:
    """``--profile-steps WAIT,WARMUP,ACTIVE`` -> three integers (ACTIVE >= 1)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        wait, warmup, active = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--profile-steps must be WAIT,WARMUP,ACTIVE (three integers), got {text!r}") from None
    if wait < 0 or warmup < 0 or active < 1:
        raise UserError(f"--profile-steps must be WAIT,WARMUP,ACTIVE with WAIT, WARMUP >= 0 and ACTIVE >= 1, "
                        f"got {text!r}")
    return wait, warmup, active


def validate_diagnostics(cfg) -> None:
    profile_window(cfg.profile_steps)
    if cfg.tensorboard:
        from ..outputs.tracking import require

        require("tensorboard", "--tensorboard", extra="tensorboard")
