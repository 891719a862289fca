"""End-of-training outputs beyond the core: exact test predictions → confusion_matrix.json, the
pictures (``plots.py``) and ``model.pt2`` (``export.py``).

Order matters under DDP: every rank first takes part in the last collective (``final_predictions``:
the final evaluation's per-rank predictions assembled on every rank), then the ranks pass their last
barrier, and only then does global rank 0 alone write files, draw and export while the others
leave — no rank-0-only work ever sits inside a collective window.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..data.mnist import NUM_CLASSES
from ..dist import DistEnv, all_reduce_sum
from .rundir import atomic_write_bytes


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


def final_predictions(result: Any, n: int, env: DistEnv) -> torch.Tensor:
    """Every test image's predicted class, on every rank, from an evaluation's per-rank predictions
    (``loop/evaluate.py`` keeps them): one all_reduce(SUM) of disjoint shards, no second forward pass."""
    predicted = torch.zeros(n, dtype=torch.int64, device=result.predicted.device)
    predicted[result.shard] = result.predicted
    return all_reduce_sum(predicted, env).cpu()


def write_final_outputs(run_dir: str | os.PathLike, cfg: Any, model: torch.nn.Module, labels: torch.Tensor,
                        predicted: torch.Tensor | None) -> None:
    """Rank 0 only, after the last collective: confusion_matrix.json, then the pictures (drawn by a
    second process) while this one writes model.pt2."""
    from .plots import CONFUSION_JSON, finish_drawing, start_drawing

    run = Path(run_dir)
    drawing = None
    if cfg.plots and predicted is not None:
        write_json(run / CONFUSION_JSON, confusion(labels, predicted))
        if pictures_possible():
            drawing = start_drawing(run, cfg.data_dir)
    if cfg.export:
        from .export import save_export

        save_export(model, cfg.normalize, run)
    if drawing is not None and (error := finish_drawing(drawing)):
        from .tracking import notice

        notice(f"pictures were not drawn ({error}); redraw with `python -m mnist_dist plot --run-dir {run}`")


def pictures_possible() -> bool:
    """The pictures are a convenience: without matplotlib, one notice line instead of a failure."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from .tracking import notice

        notice("matplotlib is not installed: no pictures (pip install 'mnist-dist[track]', "
               "then `python -m mnist_dist plot --run-dir DIR`)")
        return False
    return True
