"""``model.pt2``: the trained network as a ``torch.export`` program that includes the input normalisation.

Input: float images in [0, 1], shape [N, 1, 28, 28] for any N >= 1 (white digit on black, as MNIST).
Output: logits [N, 10]. Loading needs torch only, none of our code::

    program = torch.export.load("runs/RUN/model.pt2")
    logits = program.module()(images)          # images: float32 [N, 1, 28, 28] in [0, 1]

The normalisation is the run's own: MNIST mean/std when the run trained with ``normalize`` (the
default recipe), none when it did not (the ``seed`` recipe feeds pixels in [0, 1]).
"""

from __future__ import annotations

import copy
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
    from .rundir import atomic_path

    path = Path(run_dir) / EXPORT_FILE
    program = export_program(model, normalize)
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    return path


def load_classifier(run_dir: str | os.PathLike) -> nn.Module:
    """[0, 1] pixels → logits: ``model.pt2`` when present, else built from ``model.pt`` + config.json."""
    path = Path(run_dir) / EXPORT_FILE
    if path.is_file():
        try:
            return torch.export.load(str(path)).module()
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UserError(f"{path} is corrupt or unreadable: {reason}") from None
    from .rundir import load_run_model

    model, config = load_run_model(run_dir, map_location="cpu")
    return PixelsToLogits(model, bool(config.get("normalize", True))).eval()
