"""Commands on a finished run directory: ``predict`` (image files → digits), ``plot``, ``export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .arguments import add_location_args

EXIT_SOME_FILES_FAILED = 1


def predict_command(argv: Sequence[str]) -> int:
    import torch

    from ..outputs.export import load_classifier
    from .images import POLARITIES, ImageError, load_digit

    parser = argparse.ArgumentParser(
        prog="mnist-dist predict",
        description="Predict the digit in each image file (PNG/JPEG, colour or grey, up to 64 megapixels) "
                    "with the model rebuilt from the run's model.pt and config.json (model.pt2 is never "
                    "loaded). Images are converted the way MNIST was made: digit scaled into 20x20, "
                    "centred by mass in 28x28, white on black. Prints one line per file: "
                    "PATH<TAB>digit D<TAB>probability P; a file that cannot be read gets one 'error: PATH: "
                    "why' line and the others are still predicted. Exit 1 if any file failed.",
    )
    add_location_args(parser, run_dir=True, data_dir=False)
    parser.add_argument("--polarity", default="auto", choices=POLARITIES,
                        help="auto: a light border means dark ink on light paper, which is inverted; "
                             "or force light-on-dark (as MNIST) / dark-on-light")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    args = parser.parse_args(argv)
    classifier = load_classifier(args.run_dir)
    failed = 0
    for path in args.images:
        try:
            x = load_digit(path, args.polarity)
        except ImageError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        with torch.no_grad():
            probs = torch.softmax(classifier(x[None]).float(), dim=1)[0]
        digit = int(probs.argmax())
        print(f"{path}\tdigit {digit}\tprobability {probs[digit].item():.4f}", flush=True)
    if failed:
        print(f"error: {failed} of {len(args.images)} image(s) could not be read", file=sys.stderr, flush=True)
        return EXIT_SOME_FILES_FAILED
    return 0


def plot_command(argv: Sequence[str]) -> int:
    from ..data.mnist import resolve_data_dir
    from ..outputs.plots import draw_all

    parser = argparse.ArgumentParser(
        prog="mnist-dist plot",
        description="Redraw curves.png, confusion_matrix.png and mistakes.png from a run directory "
                    "(metrics.jsonl, confusion_matrix.json and the MNIST test images).",
    )
    add_location_args(parser, run_dir=True, data_dir=True)
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise UserError(f"run directory {args.run_dir} does not exist")
    for path in draw_all(args.run_dir, resolve_data_dir(args.data_dir)):
        print(path, flush=True)
    return 0


def export_command(argv: Sequence[str]) -> int:
    from ..outputs.export import save_export
    from ..outputs.rundir import load_run_model

    parser = argparse.ArgumentParser(
        prog="mnist-dist export",
        description="Write RUN_DIR/model.pt2 (torch.export, input normalisation included) from the "
                    "run's model.pt, e.g. for a run trained with --no-export.",
    )
    add_location_args(parser, run_dir=True, data_dir=False)
    args = parser.parse_args(argv)
    model, config = load_run_model(args.run_dir, map_location="cpu")
    print(save_export(model, bool(config.get("normalize", True)), args.run_dir), flush=True)
    return 0
