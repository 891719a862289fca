"""Observers of a run: one small interface, called once per event.

The run's own files (``metrics.jsonl``, ``evaluations.jsonl``, the summary) are written by the loop
itself; everything optional listens here: wandb (``outputs/tracking.py``), TensorBoard
(``outputs/tensorboard.py``), ``--profile`` (``diagnostics/profile.py``), the Ray launcher's
checkpoint reports, and the tests' fault injection (only when ``$MNIST_DIST_FAULT`` is set). Every
method is optional: the base class does nothing.
"""

from __future__ import annotations

from typing import Any


class Callback:
    def on_step(self, global_step: int, loss: Any, optimizer: Any) -> None:
        """After each optimizer step, on every rank (``loss`` is a device tensor: reading it syncs)."""

    def on_epoch(self, record: dict[str, Any], global_step: int) -> None:
        """An epoch's ``metrics.jsonl`` record, on every rank."""

    def on_checkpoint(self, path: str | None, metrics: dict[str, Any]) -> None:
        """After each checkpoint, on every rank (``path`` on global rank 0, else None)."""

    def summary(self, env: Any) -> dict[str, Any]:
        """Keys for ``summary.json``. A collective: every rank calls it."""
        return {}

    def on_final_writes(self, global_step: int) -> None:
        """Global rank 0, after the ranks' last barrier, before the final files are written."""

    def on_end(self, summary: dict[str, Any], meta: dict[str, Any]) -> None:
        """Global rank 0, after the final files (weights, summary, pictures, export) exist."""


class Callbacks(Callback):
    """Several callbacks as one, called in the order they were added."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def add(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def on_step(self, global_step: int, loss: Any, optimizer: Any) -> None:
        for c in self.callbacks:
            c.on_step(global_step, loss, optimizer)

    def on_epoch(self, record: dict[str, Any], global_step: int) -> None:
        for c in self.callbacks:
            c.on_epoch(record, global_step)

    def on_checkpoint(self, path: str | None, metrics: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_checkpoint(path, metrics)

    def summary(self, env: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.callbacks:
            out.update(c.summary(env))
        return out

    def on_final_writes(self, global_step: int) -> None:
        for c in self.callbacks:
            c.on_final_writes(global_step)

    def on_end(self, summary: dict[str, Any], meta: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_end(summary, meta)
