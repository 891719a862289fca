"""``mnist-dist evaluate --run-dir DIR``: a run's final weights on all 10,000 test images, exactly,
alone or under torchrun at any world size. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from ..errors import UserError
from .arguments import add_location_args


def evaluate_command(argv: Sequence[str]) -> int:
    from .. import dist
    from ..data import mnist as data
    from ..engines._base import resolve_precision
    from ..metrics import evaluate
    from ..outputs.rundir import load_run_model

    parser = argparse.ArgumentParser(
        prog="mnist-dist evaluate",
        description="Evaluate a run's final weights on all 10,000 test images (exact at any world "
                    "size; run alone or under torchrun). Prints one JSON line.",
    )
    add_location_args(parser, run_dir=True, data_dir=True)
    parser.add_argument("--batch-size", type=int, default=1000, help="per-rank evaluation batch")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="fail instead of downloading missing MNIST files")
    parser.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default="off", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--dist-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if not args.dist_timeout > 0:
        raise UserError(f"--dist-timeout must be positive, got {args.dist_timeout}")
    root = data.resolve_data_dir(args.data_dir)
    env = dist.setup(args.backend, args.device, args.dist_timeout)
    try:
        model, config = load_run_model(args.run_dir, map_location=env.device)
        data.prepare(root, env, args.download)
        images, labels = data.load_split(root, train=False)
        x = data.to_float(images, bool(config.get("normalize", True))).to(env.device)
        result = evaluate(model, x, labels.to(env.device), env, args.batch_size,
                          resolve_precision(args.amp, env.device).autocast())
        if env.is_main:
            print(json.dumps({
                "test_correct": result.correct,
                "test_total": result.total,
                "test_accuracy": result.accuracy,
                "test_loss": result.loss,
                "world_size": env.world_size,
                "run_dir": str(args.run_dir),
            }, sort_keys=True), flush=True)
        env.barrier()
    finally:
        dist.teardown()
    return 0
