"""``model.pt2``: the trained network as a ``torch.export`` program that includes the input normalisation.

Input: float images in [0, 1], shape [N, 1, 28, 28] for any N >= 1 (white digit on black, as MNIST).
Output: logits [N, 10]. For deployment: none of our commands loads it (``predict`` rebuilds the model
from ``model.pt``, see ``load_classifier``). Loading needs torch only, none of our code, and trust in
the file (``torch.export.load`` may unpickle parts of the archive)::

    program = torch.export.load("runs/RUN/model.pt2")
    logits = program.module()(images)          # images: float32 [N, 1, 28, 28] in [0, 1]

The normalisation is the run's own: MNIST mean/std when the run trained with ``normalize`` (the
default recipe), none when it did not (the ``seed`` recipe feeds pixels in [0, 1]).
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import torch
from torch import nn

from ..data.mnist import IMAGE_SIDE, MNIST_MEAN, MNIST_STD
from ..errors import UserError

EXPORT_FILE = "model.pt2"


class PixelsToLogits(nn.Module):
    """The network plus its input normalisation: [0, 1] pixels in, logits out."""

    def __init__(self, model: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize
        # the same arithmetic as torchvision's Normalize: (x - mean) / std with float32 tensors
        self.register_buffer("mean", torch.tensor([MNIST_MEAN], dtype=torch.float32).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([MNIST_STD], dtype=torch.float32).view(1, 1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            images = (images - self.mean) / self.std
        return self.model(images)


def export_program(model: nn.Module, normalize: bool) -> torch.export.ExportedProgram:
    """Export a CPU copy of ``model`` (the raw module, never the DDP wrapper) with a dynamic batch.
    The copy's weights are made contiguous: a channels_last model (``--channels-last``) would
    otherwise leave strided weights that torch's archive writer warns about."""
    plain = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    wrapper = PixelsToLogits(plain, normalize).eval()
    example = torch.rand(2, 1, IMAGE_SIDE, IMAGE_SIDE)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},))


def save_export(model: nn.Module, normalize: bool, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/model.pt2`` atomically (tmp file, then rename)."""
    from .rundir import atomic_write_bytes

    path = Path(run_dir) / EXPORT_FILE
    program = export_program(model, normalize)
    buffer = io.BytesIO()  # serialised first: a full disk is then an OSError naming the file
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_classifier(run_dir: str | os.PathLike) -> nn.Module:
    """[0, 1] pixels → logits, rebuilt from ``model.pt`` (loaded weights-only) + config.json.

    Never ``model.pt2``: ``torch.export.load`` unpickles any weight its archive marks ``use_pickle``,
    so a crafted file would run code; and a stale one would outlive a newer ``model.pt``."""
    from .rundir import WEIGHTS_FILE, load_run_model

    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file() and (Path(run_dir) / EXPORT_FILE).is_file():
        raise UserError(f"{weights} is missing: the model is rebuilt from model.pt and config.json "
                        f"({EXPORT_FILE} is for deployment and is never loaded: loading it can run code)")
    model, config = load_run_model(run_dir, map_location="cpu")
    return PixelsToLogits(model, bool(config.get("normalize", True))).eval()
