"""The default engine: our own ``dist.setup`` and ``torch.nn.parallel.DistributedDataParallel``."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist
from ..config import TrainConfig
from ._base import Engine, resolve_precision


class DDPEngine(Engine):
    name = "ddp"

    @classmethod
    def setup(cls, cfg: TrainConfig) -> "DDPEngine":
        env = dist.setup(cfg.backend, cfg.device, cfg.dist_timeout, cfg.threads)
        return cls(cfg, env, resolve_precision(cfg.amp, env.device))  # impossible --amp fails here

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return model
        device = self.env.device
        # gradient_as_bucket_view: gradients ARE views into DDP's all_reduce buckets (no copy, less memory)
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True)


ENGINE = DDPEngine
