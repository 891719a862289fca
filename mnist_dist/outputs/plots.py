"""Pictures of a run, drawn headless (matplotlib's Agg backend) from the files in the run directory.

    curves.png             loss and accuracy per epoch, train and test      (from metrics.jsonl)
    confusion_matrix.png   true digit x predicted digit counts              (from confusion_matrix.json)
    mistakes.png           misclassified test digits, labelled true → predicted (json + MNIST test images)

``confusion_matrix.json`` itself is written by ``outputs/report.py`` from exact predictions on all
10,000 test images. Everything here reads files only, so ``python -m mnist_dist plot --run-dir DIR``
redraws the same pictures later — and the training process draws them with that very command in a
second process (``report.start_drawing``), next to its own export. Nothing here imports torch: the drawing
process starts in well under a second (matplotlib's Figure API, no pyplot).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .rundir import atomic_path

CURVES_FILE = "curves.png"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"
MISTAKES_FILE = "mistakes.png"
MAX_MISTAKES = 36


def new_figure(**kwargs):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot); a clear error when missing."""
    from ..console import require

    require("matplotlib", "pictures (--plots / `mnist-dist plot`)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def draw_curves(metrics: list[dict[str, Any]], path: Path) -> None:
    epochs = [m["epoch"] for m in metrics]
    fig = new_figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split, style in (("train", "o-"), ("test", "s--")):
        ax_loss.plot(epochs, [m[f"{split}_loss"] for m in metrics], style, label=split)
        ax_acc.plot(epochs, [100 * m[f"{split}_accuracy"] for m in metrics], style, label=split)
    ax_loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="% correct")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs)
    _save(fig, path)


def draw_confusion(counts: list[list[int]], path: Path) -> None:
    import numpy as np

    matrix = np.asarray(counts)
    fig = new_figure(figsize=(7, 6))
    ax = fig.subplots()
    # log colour scale so that the few mistakes are visible next to ~1,000 correct per class
    image = ax.imshow(np.log1p(matrix), cmap="Blues")
    for t in range(matrix.shape[0]):
        for p in range(matrix.shape[1]):
            if matrix[t, p]:
                ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                        color="white" if t == p else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"confusion matrix ({matrix.trace()}/{matrix.sum()} correct)")
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    _save(fig, path)


def draw_mistakes(images_u8, mistakes: list[dict[str, int]], path: Path) -> None:
    """The misclassified digits as one mosaic image (one imshow: fast), each tile labelled true → predicted."""
    import numpy as np

    shown = mistakes[:MAX_MISTAKES]
    cols = 6
    rows = max(1, (len(shown) + cols - 1) // cols)
    side, label = 28, 12  # pixels of a digit, and of the strip above it that holds its label
    cell_w, cell_h = side + 4, side + label
    mosaic = np.zeros((rows * cell_h, cols * cell_w), dtype=np.uint8)
    for i, m in enumerate(shown):
        r, c = divmod(i, cols)
        y0, x0 = r * cell_h + label, c * cell_w + 2
        mosaic[y0:y0 + side, x0:x0 + side] = np.asarray(images_u8[m["index"]])
    fig = new_figure(figsize=(cols * 1.5, rows * 1.7))
    ax = fig.subplots()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for i, m in enumerate(shown):
        r, c = divmod(i, cols)
        ax.text(c * cell_w + cell_w / 2, r * cell_h + label / 2, f"{m['label']} → {m['predicted']}",
                ha="center", va="center", color="white", fontsize=10)
    ax.axis("off")
    ax.set_title(f"misclassified test digits, true → predicted ({len(shown)} of {len(mistakes)})")
    _save(fig, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def draw_all(run_dir: str | os.PathLike, data_dir: str) -> list[Path]:
    """Draw the three pictures from the run directory (and the MNIST test images); return the paths."""
    from ..data.mnist import read_split

    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    try:
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{metrics_path} is missing: not a finished mnist-dist run directory") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {metrics_path}: {exc}") from None
    confusion = _read_json(run / CONFUSION_JSON)
    written = []
    if metrics:
        draw_curves(metrics, run / CURVES_FILE)
        written.append(run / CURVES_FILE)
    draw_confusion(confusion["counts"], run / CONFUSION_PNG)
    written.append(run / CONFUSION_PNG)
    images, _ = read_split(data_dir, train=False)
    draw_mistakes(images, confusion["mistakes"], run / MISTAKES_FILE)
    written.append(run / MISTAKES_FILE)
    return written
