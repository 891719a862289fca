"""Distributed setup in one audited place: who am I, which device, which backend; the few collectives
the job uses (sums, gathers, broadcasts of small objects).

Works in four situations:
  * ``python train_ddp.py``: no launcher variables, no process group, world size 1;
  * ``torchrun`` (any number of nodes): RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE are set;
  * anything else that sets the same variables (``accelerate launch``, ``srun`` + torchrun, a
    Kubeflow PyTorchJob pod);
  * a launcher that created the process group itself (Ray Train): ``adopt`` builds the DistEnv
    from what that launcher says, and joins nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank, 0 .. world_size-1
    local_rank: int  # rank on this node; its GPU is cuda:LOCAL_RANK (round-robin when gloo shares GPUs)
    world_size: int  # processes in the job
    local_world_size: int  # processes on this node
    device: torch.device  # cuda:LOCAL_RANK or cpu
    backend: str | None  # nccl / gloo when a process group exists, None for a plain run
    launcher: str = "python"  # who started the ranks: python, torchrun, env (RANK/... set by another), ray

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def launcher_world() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) as set by torchrun, or a single process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size if "LOCAL_RANK" in os.environ else 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world_size}")
    if not 0 <= local_rank < max(local_world_size, 1):
        raise UserError(
            f"inconsistent launcher environment: LOCAL_RANK={local_rank} "
            f"LOCAL_WORLD_SIZE={local_world_size}"
        )
    return rank, local_rank, world_size, local_world_size


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def launcher_name() -> str:
    """summary.json's ``launcher``: torchrun (its agent sets TORCHELASTIC_RUN_ID), env (RANK,
    WORLD_SIZE and MASTER_ADDR set by something else, e.g. a Kubeflow PyTorchJob), or python."""
    if not launched_by_torchrun():
        return "python"
    return "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "env"


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_threads(local_world_size: int) -> int:
    """torch threads (or compile workers) per rank when not set: the usable cores, shared by the ranks
    of this node."""
    return max(1, usable_cpu_count() // max(local_world_size, 1))


def pick_device(requested: str, local_rank: int, local_world_size: int, share: bool = False) -> torch.device:
    """cuda:LOCAL_RANK (never the global rank), or the CPU. ``share``: more local ranks than GPUs
    take the GPUs round-robin (gloo moves CUDA tensors through the host, so ranks may share a GPU;
    NCCL refuses two ranks on one GPU) — used to test multi-rank CUDA paths on one GPU."""
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise UserError("--device cuda was requested but CUDA is not available on this machine")
    if requested == "cpu" or not cuda:
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if local_world_size > visible and not share:
        raise UserError(
            f"{local_world_size} processes on this node but only {visible} visible GPU(s); "
            f"use --nproc_per_node={visible} or fewer (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}), or --backend gloo to let ranks share GPUs"
        )
    return torch.device("cuda", local_rank % visible)


def pick_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise UserError("--backend nccl needs CUDA devices; use gloo (or auto) on the CPU")
    return requested


def setup(backend: str = "auto", device: str = "auto", timeout_s: float = 300.0,
          threads: int = 0) -> DistEnv:
    """Read the launcher's environment, pick device and backend, join the process group."""
    rank, local_rank, world_size, local_world_size = launcher_world()
    dev = pick_device(device, local_rank, local_world_size, share=backend == "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.set_num_threads(threads or default_threads(local_world_size))

    chosen_backend: str | None = None
    if launched_by_torchrun():
        chosen_backend = pick_backend(backend, dev)
        if not dist.is_initialized():
            join_process_group(chosen_backend, dev, rank, world_size, timeout_s)
    elif world_size > 1:
        raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun")
    return DistEnv(rank, local_rank, world_size, local_world_size, dev, chosen_backend, launcher_name())


def adopt(rank: int, local_rank: int, world_size: int, local_world_size: int, device: torch.device,
          launcher: str, threads: int = 0) -> DistEnv:
    """The DistEnv of a process whose launcher created the process group itself (Ray Train: its
    ``TorchConfig`` backend joins every worker before the training function runs). Nothing is
    joined here, and the group is the launcher's to destroy; what the launcher says about this
    process must agree with the group it made."""
    if world_size > 1 or dist.is_initialized():
        if not dist.is_initialized():
            raise RuntimeError(f"{launcher} reports world size {world_size} but made no process group")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"{launcher} reports rank {rank} of {world_size}, its process group "
                               f"says {dist.get_rank()} of {dist.get_world_size()}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads or default_threads(local_world_size))
    backend = dist.get_backend() if dist.is_initialized() else None
    return DistEnv(rank, local_rank, world_size, local_world_size, device, backend, launcher)


def join_process_group(backend: str, device: torch.device, rank: int, world_size: int,
                       timeout_s: float) -> None:
    """init_process_group for a torchrun-launched process (both engines use it). A failed rendezvous is
    one UserError; only it is caught here (a collective that fails later is the watchdog's: exit 4)."""
    from .addresses import await_rendezvous, check_reach

    import_before_process_group()
    timeout = datetime.timedelta(seconds=timeout_s)
    addr, port = await_rendezvous(rank, timeout_s)
    with native_stderr_held():
        try:
            store = elastic_attempt_store(world_size, timeout)
            if backend == "gloo" and store is not None:  # across hosts: an address every host reaches
                check_reach(store, timeout_s, addr)
            dist.init_process_group(
                backend=backend,
                init_method=None if store is not None else "env://",
                store=store,
                rank=rank if store is not None else -1,
                world_size=world_size if store is not None else -1,
                timeout=timeout,
                device_id=device if backend == "nccl" else None,
            )
        except (RuntimeError, ValueError) as exc:  # DistNetworkError, DistStoreError, gloo's RuntimeError
            teardown()
            what = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0].rstrip('.')}"
            hint = (f"MASTER_PORT {port} is already in use on this machine: pick a free port" if "EADDRINUSE" in
                    what else f"waited up to --dist-timeout {timeout_s:g} s; check that every rank has the same "
                    f"MASTER_ADDR, MASTER_PORT and WORLD_SIZE and its own RANK, and that the port is open")
            raise UserError(f"cannot create the process group at {addr}:{port}: {what}; {hint}") from None


@contextlib.contextmanager
def native_stderr_held() -> Iterator[None]:
    """File descriptor 2 into a temporary file while the group is created, written out after, unless a
    UserError replaced it: c10d logs each failed connection try with a C++ stack before raising."""
    import shutil
    import sys
    import tempfile
    sys.stderr.flush()
    saved, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    try:
        yield
    except UserError:
        held.truncate(0)
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        held.seek(0)
        with held, open(os.dup(2), "wb") as out:
            shutil.copyfileobj(held, out)


def import_before_process_group() -> None:
    """Import, BEFORE the process group exists, the torch modules that capture it at import time.

    ``torch.distributed.nn.functional`` declares ``def broadcast(..., group=group.WORLD)``: imported
    after ``init_process_group`` (torchvision, torch._dynamo and DDP all import it lazily), that
    default argument holds the WORLD group for ever, so ``destroy_process_group`` cannot free it and
    gloo's worker threads live on into interpreter shutdown. There they may still be releasing the
    last collective's tensors, which needs the GIL, and the process dies with "terminate called
    without an active exception" (SIGABRT) AFTER its work is done (seen about 1 run in 10 at 3 ranks).
    Imported first, the default is None and destroy_process_group joins the threads.
    """
    import torch.distributed.nn  # noqa: F401


def elastic_attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The torchrun agent's store, with a key prefix per restart attempt (None: use env:// as is).

    With the c10d rendezvous, torchrun shares ONE TCPStore (the agent's) with its workers for the
    whole job, but torch's env:// handler assumes a fresh store per attempt and adds no prefix. After
    an elastic restart a new worker can then read the previous attempt's gloo addresses and fail with
    "connectFullMesh ... Connection refused" (seen here about one restart in three). Prefixing the
    keys with TORCHELASTIC_RESTART_COUNT keeps the attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mnist-dist/attempt_{attempt}/", store)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(env: DistEnv, local: bool = True) -> Iterator[None]:
    """The (local) main process runs the block first; the others enter once it has finished."""
    is_first = env.is_local_main if local else env.is_main
    if not is_first:
        env.barrier()
    try:
        yield
    finally:
        if is_first:
            env.barrier()


def synchronize(device: torch.device) -> None:
    """Wait for the device (honest timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- checks that name ranks
def checked_barrier(env: DistEnv, timeout_s: float) -> None:
    """A barrier that names the ranks that did not arrive (at start-up, epoch ends, before checkpoints).

    gloo: ``monitored_barrier(wait_all_ranks=True)``; rank 0 fails with "Ranks 1, 3 failed to pass
    monitoredBarrier in 20000 ms", the others with a timeout (its deadline must be given: without
    one it would be torch's 30-minute default, not the group's). NCCL: a plain barrier (the Flight
    Recorder names absentees there, see diagnostics/flight.py)."""
    if not env.distributed:
        return
    if env.backend == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    else:
        env.barrier()


# ----------------------------------------------------------------------------- collectives
def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place SUM over ranks (no-op for a plain single process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
