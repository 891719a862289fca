"""torch's Flight Recorder: a ring buffer of the last collectives of every process group (name, sizes,
sequence number, state, the Python stack that issued it), for NCCL and, since torch 2.8, gloo.

* ``prepare(out_dir)`` runs before the process group exists (``entry.setup_engine``): it switches the
  recorder on (``TORCH_FR_BUFFER_SIZE=2000`` entries; torch 2.14's name for what was
  ``TORCH_NCCL_TRACE_BUFFER_SIZE``, which it still reads, with a deprecation warning), asks NCCL to dump it when a collective times out (``TORCH_NCCL_DUMP_ON_TIMEOUT=1``), and
  points the dumps at ``<out-dir>/debug/fr_trace_rank_<N>`` (``TORCH_FR_DUMP_TEMP_FILE``; torch reads
  it when it first dumps). Variables the user set win.
* ``dump(debug_dir, rank)``: gloo has no dump-on-timeout of its own, so the watchdog writes this
  rank's buffer in the same format when a collective fails (and when the rank stalls).
* ``summarize(debug_dir)`` reads the dumps back for ``mnist-dist doctor`` and hands them to torch's
  own matcher (``torch.distributed.flight_recorder``, the library behind ``python -m
  torch.distributed.flight_recorder.fr_trace``). Not with torch's reader (``loader.read_dir``): that is
  a plain ``pickle.load``, and a crafted dump would run code. ``read_dumps`` unpickles plain data only
  (dicts, lists, tuples, strings, bytes, numbers, bools, None: all a dump holds); a dump that names
  any Python object is refused, and said so, and the other dumps are still read.
"""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path
from typing import Any

PREFIX = "fr_trace_rank_"
BUFFER_ENTRIES = "2000"
_OURS: dict[str, str] = {}  # the variables this module set (and may therefore move)


def _setdefault(name: str, value: str) -> None:
    if name not in os.environ:
        os.environ[name] = _OURS[name] = value


def prepare(out_dir: str) -> None:
    """Before ``init_process_group``: the recorder on, NCCL's dump on timeout, dumps into debug/."""
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:  # the older name (torch warns it is deprecated)
        _setdefault("TORCH_FR_BUFFER_SIZE", BUFFER_ENTRIES)
    _setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    point_dumps_at(out_dir)


def point_dumps_at(out_dir: str) -> None:
    """Where NCCL writes its dumps (again after the ranks agreed on the run directory)."""
    prefix = str(Path(out_dir).resolve() / "debug" / PREFIX)
    if "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" in os.environ and "TORCH_FR_DUMP_TEMP_FILE" not in _OURS:
        return  # the user's choice, under the older name
    if "TORCH_FR_DUMP_TEMP_FILE" not in os.environ or "TORCH_FR_DUMP_TEMP_FILE" in _OURS:
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = _OURS["TORCH_FR_DUMP_TEMP_FILE"] = prefix


def enabled() -> bool:
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        try:
            if int(os.environ.get(name, "0")) > 0:
                return True
        except ValueError:
            pass
    return False


def dump(debug_dir: Path, rank: int) -> Path | None:
    """This rank's recorder buffer (every process group) as torch's pickle dump; None if off/empty."""
    if not enabled():
        return None
    try:
        import torch

        data = torch._C._distributed_c10d._dump_fr_trace()
    except Exception:  # noqa: BLE001 - an older torch, or no recorder: nothing to add
        return None
    path = debug_dir / f"{PREFIX}{rank}"
    # a name torch's reader skips (it reads every file with PREFIX), one per thread: the watchdog's stall
    # dump and the main thread's failure dump may be written at the same moment
    tmp = debug_dir / f".recorder-{rank}.{os.getpid()}-{threading.get_ident()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


class _PlainData(pickle.Unpickler):
    """Unpickles plain data only: every global (a class, a function: how a pickle runs code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it holds a Python object ({module}.{name})")


def read_dumps(debug_dir: Path) -> tuple[dict[str, dict[str, Any]], str, list[str]]:
    """What torch's ``loader.read_dir`` returns (file name → host_name, rank, entries, version,
    pg_config; the first dump's version) for the dumps of ``debug_dir``, read with ``_PlainData``;
    plus one line per dump refused or unreadable."""
    details: dict[str, dict[str, Any]] = {}
    refused = []
    for path in sorted(debug_dir.glob(f"{PREFIX}*")):
        if not path.name[len(PREFIX):].isdigit() or not path.is_file():
            continue
        try:
            with open(path, "rb") as fh:
                dump = _PlainData(fh).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            refused.append(f"refused {path.name}: {' '.join(str(exc).split())[:200] or 'not a pickle'}")
            continue
        except (OSError, ValueError, RecursionError, MemoryError) as exc:
            refused.append(f"refused {path.name}: unreadable ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        if not (isinstance(dump, dict) and isinstance(dump.get("entries"), list)
                and isinstance(dump.get("pg_config"), dict) and "version" in dump):
            refused.append(f"refused {path.name}: not a Flight Recorder dump (no entries, pg_config, version)")
            continue
        rank = int(path.name[len(PREFIX):])
        details[path.name] = {"host_name": f"host_rank{rank}", "rank": rank, "entries": dump["entries"],
                              "version": dump["version"], "pg_config": dump["pg_config"]}
    version = str(next(iter(details.values()))["version"]) if details else ""
    return details, version, refused


def summarize(debug_dir: Path) -> dict[str, Any] | None:
    """The dumps in ``debug_dir`` (``read_dumps``): per rank, its last collective; the group's ranks
    without a dump; the collectives torch's matcher found incomplete (with the ranks missing); the
    dumps refused."""
    if not any(p.name[len(PREFIX):].isdigit() for p in debug_dir.glob(f"{PREFIX}*")):
        return None
    import argparse
    import logging

    logging.getLogger("Flight Recorder").setLevel(logging.CRITICAL)  # its matcher logs every mismatch
    args = argparse.Namespace(trace_dir=str(debug_dir), prefix=PREFIX, selected_ranks=None, pg_filters=None,
                              allow_incomplete_ranks=True, just_print_entries=False, verbose=False,
                              print_stack_trace=False, mismatch_cap=10, transform_ft=False,
                              group_world_size=None, output=None)
    details, version, refused = read_dumps(debug_dir)
    ranks: dict[int, Any] = {}
    expected: set[int] = set()
    for dump_ in details.values():
        entries = dump_["entries"]
        for pg in dump_["pg_config"].values():
            expected |= set(int(r) for r in str(pg["ranks"]).strip("[]").split(",") if r.strip())
        last = entries[-1] if entries else None
        ours = [f for f in (last or {}).get("frames", []) if "/mnist_dist/" in f.get("filename", "")]
        ranks[int(dump_["rank"])] = None if last is None else {
            "collective": last["profiling_name"],
            "seq": last["collective_seq_id"],
            "state": last["state"],
            "sizes": last["input_sizes"],
            "entries": len(entries),
            "from": (f"mnist_dist/{ours[0]['filename'].rsplit('/mnist_dist/', 1)[1]}:{ours[0]['line']} in "
                     f"{ours[0]['name']}") if ours else None,
        }
    incomplete = []
    try:
        if not details:
            raise ValueError("no dump could be read")
        from torch.distributed.flight_recorder.components.builder import build_db

        _name_gloo_groups(details)
        db = build_db(details, args, version)
        incomplete = [{"collective": c.collective_name, "seq": c.collective_seq_id,
                       "missing_ranks": sorted(c.missing_ranks)}
                      for c in db.collectives if c.missing_ranks]
    except Exception as exc:  # noqa: BLE001 - the matcher is best effort on partial dumps
        incomplete = [{"error": f"{type(exc).__name__}: {exc}"}]
    return {"version": version, "ranks": ranks, "without_dump": sorted(expected - set(ranks)),
            "incomplete": incomplete, "refused": refused}


def _name_gloo_groups(details: dict[str, Any]) -> None:
    """torch 2.14's gloo recorder names the default group '0' in its entries but '' in ``pg_config``,
    and torch's matcher (also ``fr_trace``) then fails with KeyError ('0', rank): name it the same."""
    for dump_ in details.values():
        config = dump_["pg_config"]
        groups = {tuple(e["process_group"]) for e in dump_["entries"]}
        if "" in config and len(groups) == 1:
            name, desc = next(iter(groups))
            if name not in config:
                config[name] = dict(config.pop(""), name=name, desc=desc)
