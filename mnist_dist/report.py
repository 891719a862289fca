"""End-of-training outputs beyond the core: exact test predictions → confusion_matrix.json, the
pictures (``plots.py``) and ``model.pt2`` (``export.py``).

Order matters under DDP: every rank first takes part in the one collective (the predictions), and
only then does global rank 0 alone write files, draw and export — no rank-0-only work ever sits
inside a collective.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .data import NUM_CLASSES, eval_shard
from .dist import DistEnv
from .outputs import atomic_write_bytes
from .metrics import all_reduce_sum


@torch.no_grad()
def test_predictions(model: torch.nn.Module, images: torch.Tensor, env: DistEnv, batch_size: int = 1000,
                     autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Predicted class of every test image, on every rank. Call on EVERY rank with the raw module.

    Each rank predicts its contiguous shard (as ``metrics.evaluate`` does) into a zero vector of
    length N; one all_reduce(SUM) assembles all N predictions exactly (shards are disjoint).
    """
    n = len(images)
    shard = eval_shard(n, env.rank, env.world_size)
    predicted = torch.zeros(n, dtype=torch.int64, device=images.device)
    was_training = model.training
    model.eval()
    for start in range(shard.start, shard.stop, batch_size):
        stop = min(start + batch_size, shard.stop)
        with autocast or contextlib.nullcontext():
            logits = model(images[start:stop])
        predicted[start:stop] = logits.float().argmax(dim=1)
    model.train(was_training)
    return all_reduce_sum(predicted, env).cpu()


def confusion(labels: torch.Tensor, predicted: torch.Tensor) -> dict[str, Any]:
    """Counts (rows: true digit, columns: predicted digit) and the list of mistakes."""
    labels, predicted = labels.cpu(), predicted.cpu()
    counts = torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES ** 2)
    wrong = (labels != predicted).nonzero().flatten().tolist()
    return {
        "rows": "true digit",
        "columns": "predicted digit",
        "counts": counts.view(NUM_CLASSES, NUM_CLASSES).tolist(),
        "total": len(labels),
        "correct": int((labels == predicted).sum()),
        "mistakes": [{"index": i, "label": int(labels[i]), "predicted": int(predicted[i])} for i in wrong],
    }


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_final_outputs(trainer, run_dir: str | os.PathLike) -> None:
    """Called by ``fit`` on every rank after training: predictions (collective), then rank 0 writes."""
    from .plots import CONFUSION_JSON

    cfg, env = trainer.cfg, trainer.env
    run = Path(run_dir)
    if cfg.plots:
        predicted = test_predictions(trainer.model, trainer.test_images, env, cfg.eval_batch_size,
                                     trainer.precision.autocast())
        if env.is_main:
            write_json(run / CONFUSION_JSON, confusion(trainer.test_labels, predicted))
            draw_pictures(run, cfg.data_dir)
    if cfg.export and env.is_main:
        from .export import save_export

        save_export(trainer.model, cfg.normalize, run)


def draw_pictures(run: Path, data_dir: str) -> None:
    """The pictures are a convenience: without matplotlib, one notice line instead of a failure."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from .tracking import notice

        notice("matplotlib is not installed: no pictures (pip install 'mnist-dist[track]', "
               "then `python -m mnist_dist plot --run-dir DIR`)")
        return
    from .plots import draw_all

    draw_all(run, data_dir)
