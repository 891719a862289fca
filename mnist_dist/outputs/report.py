"""End-of-training outputs beyond the core: exact test predictions → confusion_matrix.json, the
pictures (drawn by ``python -m mnist_dist plot`` in a second process: ``plots.py``) and ``model.pt2``
(``export.py``).

Order matters under DDP: every rank first takes part in the last collective
(``metrics.final_predictions``: the final evaluation's per-rank predictions assembled on every rank),
then the ranks pass their last barrier, and only then does global rank 0 alone write files, draw and
export while the others leave — no rank-0-only work ever sits inside a collective window.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..console import notice
from ..data.mnist import NUM_CLASSES
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


def write_final_outputs(run_dir: str | os.PathLike, cfg: Any, model: torch.nn.Module, labels: torch.Tensor,
                        predicted: torch.Tensor | None) -> None:
    """Rank 0 only, after the last collective: confusion_matrix.json, then the pictures (drawn by a
    second process) while this one writes model.pt2."""
    run = Path(run_dir)
    drawing = None
    if cfg.plots and predicted is not None:
        write_json(run / "confusion_matrix.json", confusion(labels, predicted))
        if pictures_possible():
            drawing = start_drawing(run, cfg.data_dir)
    if cfg.export:
        from .export import save_export

        save_export(model, cfg.normalize, run)
    if drawing is not None and (error := finish_drawing(drawing)):
        notice(f"pictures were not drawn ({error}); redraw with `python -m mnist_dist plot --run-dir {run}`")


def start_drawing(run_dir: str | os.PathLike, data_dir: str) -> subprocess.Popen:
    """``mnist-dist plot`` in a second process (no torch in it), so the pictures are drawn while this
    process exports the model; ``finish_drawing`` waits for it."""
    package_root = str(Path(__file__).resolve().parents[2])  # works from a checkout or an install
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                                     os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "mnist_dist", "plot", "--run-dir", str(run_dir), "--data-dir", str(data_dir)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish_drawing(proc: subprocess.Popen) -> str | None:
    """Wait for the drawing process; its error line, or None when all pictures were written."""
    _, err = proc.communicate()
    if proc.returncode == 0:
        return None
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def pictures_possible() -> bool:
    """The pictures are a convenience: without matplotlib, one notice line instead of a failure."""
    if importlib.util.find_spec("matplotlib") is None:
        notice("matplotlib is not installed: no pictures (pip install 'mnist-dist[plots]', "
               "then `python -m mnist_dist plot --run-dir DIR`)")
        return False
    return True
