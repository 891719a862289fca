"""Distributed checkpoints (``--checkpoint-format dcp``): every rank writes its own shards.

A checkpoint is a directory ``<out-dir>/checkpoints/step-<global step, 8 digits>/``:

* the model and optimizer through ``torch.distributed.checkpoint`` (DCP): ``get_state_dict`` gives
  each rank its part (its shards under FSDP2; under DDP the replicated tensors, which DCP writes once),
  ``.metadata`` plus one ``__<rank>_<n>.distcp`` file per writing rank; a resume at another world size
  reshards on load;
* ``run.pt``: the rest of the run's state, as in the full format (position, schedule, clock, every
  rank's RNG states, the epoch's sums, the config), written by rank 0 and loaded weights-only;
* ``checksums.json``: the sha256 of every file, written last.

The directory is written under a temporary name (``.step-<N>.dcp-tmp``) and renamed when complete,
so a ``step-*`` directory is a complete checkpoint and a save killed midway leaves only a temporary
directory, which the next save removes. Every rank writes into the same directory: DCP needs storage
that every rank sees (``check_shared_storage`` says so at start when it is not).

Nothing from such a directory runs code: torch's reader unpickles ``.metadata`` with ``pickle.load``
and its planner loads non-tensor items with ``weights_only=False``; ``SafeReader`` unpickles only the
metadata's own classes and ``SafeLoadPlanner`` loads items weights-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .dist import DistEnv, all_reduce_sum, gather_objects
from .errors import UserError

RUN_FILE, CHECKSUMS = "run.pt", "checksums.json"
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "torch": {"Size"},
}


class MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` classes and torch's dtypes; any other global (how a pickle runs code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"its .metadata names {module}.{name}, which a checkpoint never holds")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        with open(Path(self.path) / ".metadata", "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items (the optimizer's hyper-parameters) loaded weights-only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        item = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
        else:
            self.state_dict[read_item.dest_index.fqn] = item


@contextlib.contextmanager
def one_process_quietly() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def temp_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.dcp-tmp")


def file_digests(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def check_shared_storage(out_dir: str | os.PathLike, env: DistEnv) -> None:
    """Every rank must see rank 0's checkpoint directory (a file rank 0 just wrote); one line if not."""
    from .outputs.shared import blind_ranks

    folder = Path(out_dir) / "checkpoints"
    blind = blind_ranks(folder, env)
    if blind:
        raise UserError(f"--checkpoint-format dcp needs storage every rank sees, but rank(s) "
                        f"{', '.join(map(str, blind))} do not see {folder}; put --out-dir on shared storage, "
                        f"or use --checkpoint-format full (rank 0 alone writes it)")


class Pending:
    """A save in flight (``--async-checkpoint``): its future on every rank, finished by ``finish``."""

    def __init__(self, future: Any, tmp: Path, final: Path, run: dict[str, Any] | None) -> None:
        self.future, self.tmp, self.final, self.run = future, tmp, final, run
        self.metrics: dict[str, Any] = {}  # what the observers hear when it completes


def background_group(env: DistEnv) -> Any:
    """A gloo group of its own for the background writes (a collective): on the training group their
    collectives would interleave with the step's all_reduces from another thread and deadlock; and
    async_save refuses an NCCL-only group."""
    return torch.distributed.new_group(backend="gloo") if env.distributed else None


def start_save(final: Path, model: torch.nn.Module, optimizer: Any, run: dict[str, Any] | None,
               env: DistEnv, asynchronous: bool, group: Any = None) -> Pending:
    """Every rank writes its shards into the temporary directory (``run``: rank 0's run state);
    ``asynchronous``: in a background thread, collectives on ``group`` (``background_group``)."""
    tmp = temp_dir(final)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    writer = FileSystemWriter(str(tmp), single_file_per_rank=True)
    no_dist = not env.distributed
    with one_process_quietly():
        if asynchronous:
            future = dcp.async_save(state, storage_writer=writer, no_dist=no_dist, process_group=group)
        else:
            dcp.save(state, storage_writer=writer, no_dist=no_dist)
            future = None
    return Pending(future, tmp, final, run)


def finish_save(pending: Pending, env: DistEnv, digest: Any, before_rename: Any = None) -> Path:
    """Wait for the shards, then rank 0 writes run.pt and the checksums and renames the directory.
    ``digest``: checkpoint.content_digest (run.pt carries it like a full checkpoint). A collective."""
    if pending.future is not None:
        pending.future.result()
    env.barrier()  # every rank's shards are on the disk
    if env.is_main:
        buffer = io.BytesIO()
        torch.save({**pending.run, "sha256": digest(pending.run)}, buffer)
        (pending.tmp / RUN_FILE).write_bytes(buffer.getvalue())
        names = sorted(p.name for p in pending.tmp.iterdir() if p.is_file())
        (pending.tmp / CHECKSUMS).write_text(json.dumps(file_digests(pending.tmp, names), indent=1) + "\n")
        if before_rename is not None:
            before_rename(pending.run["global_step"])
        if pending.final.exists():  # the same step again (its epoch's end): the newer state wins
            os.replace(pending.final, pending.tmp.with_suffix(".old"))
        os.replace(pending.tmp, pending.final)
        shutil.rmtree(pending.tmp.with_suffix(".old"), ignore_errors=True)
    env.barrier()
    return pending.final


def read_run(folder: Path) -> bytes:
    """run.pt's bytes, after every file of the directory matched its checksum. ``OSError``: unreadable;
    ``ValueError``: corrupt (a file missing, changed or added)."""
    try:
        expected = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        raise ValueError(f"it has no {CHECKSUMS} (a save that did not finish?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"its {CHECKSUMS} is not JSON ({exc.msg})") from None
    present = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    if not isinstance(expected, dict) or sorted(expected) != present:
        raise ValueError(f"its files ({', '.join(present)}) are not those its {CHECKSUMS} lists")
    changed = [name for name, digest in file_digests(folder, present).items() if digest != expected[name]]
    if changed:
        raise ValueError(f"{', '.join(changed)} failed the sha256 check: changed after it was written")
    try:
        with open(folder / ".metadata", "rb") as fh:
            MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise ValueError(" ".join(str(exc).split())[:200] or "its .metadata does not unpickle") from None
    return (folder / RUN_FILE).read_bytes()


def load_model_and_optimizer(folder: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Every rank reads its part of the model and optimizer (resharded to this world size). A collective."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with one_process_quietly():
            dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner(),
                     no_dist=not torch.distributed.is_initialized())
    except CheckpointException as exc:  # a BaseException holding every rank's failure and traceback
        failures = [failure[0] for failure in exc.failures.values()]  # (exception, its stack) per rank
        raise ValueError(" ".join(str(failures[0] if failures else exc).split())[:300]) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def reduce_run_state(state: dict[str, Any], env: DistEnv) -> dict[str, Any] | None:
    """The run state for run.pt (rank 0; None elsewhere): every rank's RNG states, the epoch's sums."""
    rngs = gather_objects(state["rng"], env)
    sums = all_reduce_sum(state["train_sums"].clone(), env)
    if not env.is_main:
        return None
    return {k: v for k, v in state.items() if k not in ("model", "optimizer")} | {
        "rng": rngs, "train_sums": sums.detach().cpu()}


def save_sharded(checkpoints: Any, trainer: Any, header: dict[str, Any], state: dict[str, Any], final: Path,
                 metrics: dict[str, Any]) -> str | None:
    """``Checkpoints.save`` in this format: every rank writes its shards into ``final``; with
    ``--async-checkpoint`` the write overlaps the next steps and is finished by the next save, a stop or
    the run's end (``finish_pending``). Returns the directory on rank 0 once it is complete."""
    cfg = checkpoints.cfg
    checkpoints.finish()  # one save in flight at most
    run = reduce_run_state(state, checkpoints.env)
    if run is not None:  # rank 0: the run state, in the full format's shape (run.pt)
        run = {**header, **run, "model": {}, "optimizer": {}}
    checkpoints.pending = start_save(final, trainer.model, trainer.optimizer, run, checkpoints.env,
                                     cfg.async_checkpoint, checkpoints.group)
    checkpoints.pending.metrics = metrics
    return None if cfg.async_checkpoint else checkpoints.finish()


def finish_pending(checkpoints: Any, digest: Any, prune: Any) -> str | None:
    """Complete ``checkpoints``' save in flight (a collective): checksums (``digest``), rename, rotation
    (``prune``), observers."""
    env, pending, checkpoints.pending = checkpoints.env, checkpoints.pending, None
    path = str(finish_save(pending, env, digest, checkpoints.before_rename))
    if env.is_main:
        prune(checkpoints.cfg.out_dir, checkpoints.cfg.keep)
    path = path if env.is_main else None
    if checkpoints.on_saved is not None:
        checkpoints.on_saved(path, pending.metrics)
    return path
