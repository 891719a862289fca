"""The FSDP2 engine (``--engine fsdp2``): ``torch.distributed.fsdp.fully_shard``, the same loop, data
order, metrics and outputs as ``ddp``.

What changes against DDP, and why:

* **Sharded parameters.** ``fully_shard`` is applied to every child of the model that holds parameters
  (the conv, BatchNorm and linear layers of our ``nn.Sequential`` networks: one all-gather and one
  reduce-scatter group each), then to the root, on an explicit 1-D ``DeviceMesh`` over all ranks:
  ``init_device_mesh("cpu", ...)`` under gloo (FSDP2 runs on the CPU; FSDP1 refuses it),
  ``"cuda"`` under NCCL. Each parameter becomes a ``DTensor`` holding this rank's dim-0 shard; the
  optimizer, built after wrapping, keeps its moments sharded the same way. A block's forward
  all-gathers its parameters, its backward reduce-scatters (averages) the gradients.
* ``--reshard-after-forward`` (default) frees each block's gathered parameters after its forward and
  gathers them again in the backward; ``--no-reshard-after-forward`` keeps them until the backward
  (one all-gather less per block and step, the memory of the whole unsharded model at the peak).
* **Gradient accumulation** (``--grad-accum K``): ``set_requires_gradient_sync(False)`` on all but the
  last micro-batch (DDP's ``no_sync`` does nothing to an FSDP2 module): the unsharded gradients
  accumulate locally and are reduce-scattered once.
* **Mixed precision**: on CUDA, ``--amp bf16`` is FSDP2's ``MixedPrecisionPolicy`` (bf16 parameters
  for compute and all-gathers, fp32 gradient reduction, fp32 sharded master weights) instead of
  autocast, so ``autocast()`` is a null context; the policy applies to every forward, so the
  evaluations during training run in bf16 too (``model.pt`` holds the fp32 weights). On the CPU
  ``--amp bf16`` stays autocast, as under ddp. ``--amp fp16`` is refused: its GradScaler would check
  each rank's gradient shard for inf/NaN on its own, and ranks could disagree about skipping a step.
* **BatchNorm buffers** are not sharded. Like DDP (``broadcast_buffers``), rank 0's floating buffers
  are broadcast before the first forward of each optimizer step, so the running statistics follow the
  same arithmetic as under ddp and a resume (which restores rank 0's) is exact;
  ``metrics.average_buffers`` still averages them before every evaluation.
* **State**: checkpoints and ``model.pt`` hold the FULL, unsharded model and optimizer state in
  today's single-file format (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
  ``full_state_dict=True, cpu_offload=True``: a collective, rank 0 receives the tensors), the
  optimizer's keyed by parameter index as ``torch.optim.Optimizer.state_dict`` keys it: so an fsdp2
  checkpoint resumes under ddp, a ddp checkpoint under fsdp2, at any world size. A resume loads with
  ``broadcast_from_rank0=True``: rank 0's tensors are broadcast and each rank keeps its shard. (A
  sharded state, the module's and optimizer's own ``state_dict`` on every rank, loads as it is.)
* ``--channels-last``: the input batches are channels_last, the parameters stay contiguous (FSDP2
  shards contiguous parameters only); the CPU's convolutions follow the input's layout.
* **One process**: refused. FSDP2 needs a process group; ``torchrun --nproc_per_node=1`` gives one
  with a single rank (everything "sharded" over one rank), ``--engine ddp`` trains without.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .. import dist
from ..config import TrainConfig
from ..errors import UserError
from ..models import build_model
from ..optim import IMPLEMENTATION_KEYS
from ._base import Engine, has_batchnorm, resolve_precision


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gradient_sync = True  # False inside no_sync: the micro-batches before an accumulation step's last
        self.buffers_due = True  # the next training forward starts an optimizer step: broadcast the buffers
        # on CUDA, bf16 by the policy instead of autocast
        self.policy = self.precision.name == "bf16" and self.env.device.type == "cuda"

    @classmethod
    def setup(cls, cfg: TrainConfig) -> "FSDP2Engine":
        if not dist.launched_by_torchrun():
            raise UserError("--engine fsdp2 shards the model over a process group: launch it with torchrun "
                            "(torchrun --nproc_per_node=1 for a single rank), or train one process with --engine ddp")
        if cfg.amp == "fp16":
            raise UserError("--engine fsdp2 trains with --amp bf16 or off, not fp16 (a GradScaler would check each "
                            "rank's gradient shard alone)")
        env = dist.setup(cfg.backend, cfg.device, cfg.dist_timeout, cfg.threads)
        precision = resolve_precision(cfg.amp, env.device)
        if precision.name == "fp16":  # --amp auto on a GPU without native bf16
            dist.teardown()
            raise UserError(f"--engine fsdp2 trains with --amp bf16 or off; {env.device} has no native bf16, so "
                            f"--amp auto would be fp16: pass --amp off")
        return cls(cfg, env, precision)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``fully_shard`` on each child holding parameters, then on the root; in place (``model`` IS the
        module trained through, evaluated and saved)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.policy else MixedPrecisionPolicy())
        reshard = self.cfg.reshard_after_forward
        model = model.to(memory_format=torch.contiguous_format)  # FSDP2 shards contiguous parameters only
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        # the root's own parameters (none in our networks) are needed at once by the backward: FSDP's
        # default (None) keeps them gathered
        fully_shard(model, mesh=mesh, reshard_after_forward=None if reshard else False, mp_policy=policy)
        if has_batchnorm(model):
            model.register_forward_pre_hook(self.broadcast_buffers)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.policy else self.precision.autocast()

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module) -> Iterator[None]:
        model = self.unwrap(wrapped)
        model.set_requires_gradient_sync(False)  # recurses into every sharded block
        self.gradient_sync = False
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            self.gradient_sync = True

    def broadcast_buffers(self, module: nn.Module, args: Any) -> None:
        """A forward pre-hook: rank 0's floating buffers (BatchNorm statistics) on every rank before the
        first training forward of each optimizer step, as DDP does (``broadcast_buffers``, which skips
        the forwards after one under ``no_sync``). Evaluation forwards are left alone."""
        if not (module.training and torch.is_grad_enabled()):
            return
        if self.buffers_due:
            buffers = [b for b in module.buffers() if b.is_floating_point()]
            flat = torch.cat([b.reshape(-1) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            for b, new in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(new.view_as(b))
        self.buffers_due = self.gradient_sync

    # ------------------------------------------------------------------ the full state (collectives)
    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The full model state on rank 0 (CPU tensors), {} on the other ranks. A collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rank 0's full ``state`` (the other ranks' is not read), broadcast; each rank keeps its shard.
        A sharded state (this module's own ``state_dict``: DTensors on every rank) loads as it is."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if sharded(state):
            model.load_state_dict(state)
            return
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, dict(state), options=options)  # a copy: torch replaces its values

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0, keyed by parameter index like ``optimizer.state_dict()``
        (so ddp resumes it); {} on the other ranks. A collective; but before the first step, with no
        moments yet, the optimizer's own (empty) state on every rank: torch's function would first take
        a zero step to create them, which changes Adam's step count."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if not optimizer.state:  # the same on every rank
            return optimizer.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_optimizer_state_dict(model, optimizer, options=options)
        if not full:
            return {}
        index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
        return {"state": {index[name]: value for name, value in full["state"].items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in full["param_groups"]]}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """The inverse of ``optimizer_state``; THIS optimizer's implementation choices (fused, foreach)
        are kept, as under ddp. Rank 0's ``state`` decides; the others may pass {}."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # saved before the first step (on every rank alike), or the optimizer's own sharded state
        if state and (not state["state"] or any(sharded(moments) for moments in state["state"].values())):
            return super().load_optimizer_state(model, optimizer, state)
        if state:
            names = parameter_names(model, optimizer)
            mine = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
            state = {"state": {names[i]: value for i, value in state["state"].items()},
                     "param_groups": [{**group, **keep, "params": [names[i] for i in group["params"]]}
                                      for group, keep in zip(state["param_groups"], mine)]}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, state, options=options)

    def final_model(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """A plain copy of the network with the gathered weights (rank 0, after the last barrier, where
        the sharded module's forward would wait for the other ranks' all-gathers)."""
        plain = build_model(self.cfg.model)
        plain.load_state_dict(state)
        return plain


def sharded(state: dict[str, Any]) -> bool:
    """Whether ``state`` holds DTensors (shards) rather than full tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(value, DTensor) for value in state.values())


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in the order of its integer ids."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


ENGINE = FSDP2Engine
