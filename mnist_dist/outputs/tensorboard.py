"""``--tensorboard``: global rank 0 writes ``<out-dir>/tensorboard/`` (``tensorboard --logdir DIR``).

What one run writes, every point at ``global_step`` (the x-axis, as for wandb):

* every numeric key of every ``metrics.jsonl`` record, under the same name (epoch points);
* ``batch_loss`` and ``lr`` every ``--log-every`` optimizer steps (rank 0's batch loss: one ``.item()``);
* the resolved config (``config.json``'s ``config``) as hparams, with the final ``test_accuracy`` and
  ``test_loss`` as their metrics;
* the pictures (``curves.png``, ``confusion_matrix.png``, ``mistakes.png``) as images, unchanged.

A resumed run purges the points after its checkpoint's step (``purge_step``), so the curves do not
fork. Needs the ``tensorboard`` package (``pip install 'mnist-dist[tensorboard]'``); checked with the
other flags before training.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from ..callbacks import Callback
from .tracking import PICTURES

DIR = "tensorboard"


def png_image(data: bytes) -> Any:
    """A TensorBoard image summary holding the PNG bytes as they are (no decoding)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(data[25], 3)
    return Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)


class TensorBoard(Callback):
    def __init__(self, writer: Any, every: int, out_dir: Path) -> None:
        self.writer, self.every, self.out_dir = writer, every, out_dir
        self.last_step = 0

    @classmethod
    def start(cls, cfg: Any, meta: dict[str, Any], purge_step: int | None) -> "TensorBoard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(Path(cfg.out_dir) / DIR), purge_step=purge_step)
        return cls(writer, cfg.log_every, Path(cfg.out_dir))

    def on_step(self, global_step: int, loss: Any, optimizer: Any) -> None:
        if global_step % self.every:
            return
        self.last_step = global_step
        self.writer.add_scalar("batch_loss", float(loss.item()), global_step)
        self.writer.add_scalar("lr", float(optimizer.param_groups[0]["lr"]), global_step)
        self.writer.flush()  # a live TensorBoard sees the point now (and a crash loses none)

    def on_epoch(self, record: dict[str, Any], global_step: int) -> None:
        self.last_step = global_step
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step)
        self.writer.flush()

    def on_end(self, summary: dict[str, Any], meta: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = self.writer._get_file_writer()
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in meta["config"].items()}
        metrics = {k: summary[k] for k in ("test_accuracy", "test_loss") if k in summary}
        for part in hparams(config, metrics):
            writer.add_summary(part)
        from tensorboard.compat.proto.summary_pb2 import Summary

        for name in PICTURES:
            path = self.out_dir / name
            if path.is_file():
                value = Summary.Value(tag=Path(name).stem, image=png_image(path.read_bytes()))
                writer.add_summary(Summary(value=[value]), summary.get("global_step", self.last_step))
        self.writer.close()
