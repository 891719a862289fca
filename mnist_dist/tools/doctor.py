"""``mnist-dist doctor --run-dir DIR``: who was missing and where each rank was, from ``DIR/debug/``.

Reads what the ranks left there (``diagnostics/watchdog.py``): each rank's report (``rank-N.json``:
stalls and failures, with the heartbeats it saw), its stack dumps (``rank-N.txt``: ours, with a
header, and SIGUSR2's, without), and the Flight Recorder dumps (``fr_trace_rank_N``, NCCL's or ours
for gloo), read as plain data only (``diagnostics/flight.py``: a dump that names a Python object is
refused with one line, the rest is still reported) and matched by torch's own matcher. Prints a few
lines (``--json``: the same as one JSON object). A run directory without ``debug/`` had nothing to
report; a directory with none of config.json, debug/, metrics.jsonl, summary.json is not a run
directory (one ``error:`` line, exit 2). No torch import unless there are Flight Recorder dumps;
never a process group.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any, Sequence

from ..diagnostics.stacks import describe, parse_dumps
from ..errors import UserError
from .arguments import add_location_args

MAX_WORLD = 2 ** 20  # ranks doctor lists at most: a damaged file's world size is refused, not looped over
RUN_FILES = ("config.json", "debug", "metrics.jsonl", "summary.json")  # any of them: a run directory


def _position(d: dict[str, Any]) -> str:
    if "epoch" not in d:
        return "start-up"
    return f"epoch {d['epoch']} step {d['step']} (global step {d['global_step']})"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def diagnose(run_dir: Path) -> dict[str, Any]:
    """Everything ``debug/`` says, per rank."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not any((run_dir / name).exists() for name in RUN_FILES):
        raise UserError(f"{run_dir} is not an mnist-dist run directory (no config.json, debug/, metrics.jsonl "
                        f"or summary.json)")
    debug = run_dir / "debug"
    config = _load(run_dir / "config.json") or {}
    reports = {int(p.stem.split("-")[1]): doc for p in sorted(debug.glob("rank-*.json"))
               if p.stem.split("-")[1].isdigit() and (doc := _load(p))}
    dumps = {int(p.stem.split("-")[1]): parse_dumps(p.read_text(errors="replace"))
             for p in sorted(debug.glob("rank-*.txt")) if p.stem.split("-")[1].isdigit()}
    sizes = [config.get("world_size") or 0] + [d.get("world_size", 0) for d in reports.values()]
    if not all(isinstance(n, int) and 0 <= n <= MAX_WORLD for n in sizes):
        raise UserError(f"{run_dir}: a world size in config.json or debug/rank-*.json is not an integer in "
                        f"0..{MAX_WORLD} ({', '.join(map(repr, sizes))}); the file is damaged")
    world = max(sizes + [r + 1 for r in list(reports) + list(dumps)])
    if world > MAX_WORLD:
        raise UserError(f"{run_dir}/debug names rank {world - 1}, more than doctor reads ({MAX_WORLD} ranks)")
    failures = [dict(e, rank=r) for r, d in reports.items() for e in d.get("events", []) if e["kind"] == "failure"]
    missing_by: dict[int, list[int]] = {}
    seen: dict[int, dict[str, Any]] = {}  # the newest heartbeat of each rank that any report holds
    for reporter, doc in reports.items():
        for event in doc.get("events", []):
            for rank, status in (event.get("status") or {}).items():
                if status == "missing" and event["kind"] == "failure":
                    missing_by.setdefault(int(rank), []).append(reporter)
            for rank, beat in (event.get("peers") or {}).items():
                if beat and (int(rank) not in seen or beat["time"] > seen[int(rank)]["time"]):
                    seen[int(rank)] = beat
    ranks = []
    for rank in range(world):
        events = (reports.get(rank) or {}).get("events", [])
        own = events[-1] if events else None
        rank_dumps = dumps.get(rank, [])
        on_demand = [d for d in rank_dumps if d["header"] is None]
        ranks.append({
            "rank": rank,
            "missing": rank in missing_by, "named_by": missing_by.get(rank, []),
            "report": own, "events": events, "last_heartbeat": seen.get(rank),
            "dumps": len(rank_dumps), "on_demand_dumps": len(on_demand),
            "on_demand_where": describe(on_demand[-1]["main"]) if on_demand and on_demand[-1]["main"] else None,
        })
    flight = None
    if any(debug.glob("fr_trace_rank_*")):
        from ..diagnostics.flight import summarize

        try:
            flight = summarize(debug)
        except Exception as exc:  # noqa: BLE001 - a dump that cannot be summarised is still worth a line
            flight = {"error": f"{type(exc).__name__}: {exc}"}
    return {"run_dir": str(run_dir), "world_size": world, "backend": config.get("backend"),
            "dist_timeout": (config.get("config") or {}).get("dist_timeout"),
            "finished": (run_dir / "summary.json").is_file(), "has_debug": debug.is_dir(),
            "failures": failures, "missing": sorted(missing_by), "ranks": ranks, "flight_recorder": flight}


def render(d: dict[str, Any]) -> list[str]:
    timeout = f"{d['dist_timeout']:g}" if d["dist_timeout"] else "?"
    lines = [f"run {d['run_dir']}: world size {d['world_size']}, backend {d['backend'] or '?'}, --dist-timeout "
             f"{timeout} s; {'finished' if d['finished'] else 'did not finish (no summary.json)'}"]
    if not d["has_debug"]:
        return lines + ["no debug/ directory: no rank stalled, failed or was asked for its stacks"]
    for f in d["failures"]:
        when = datetime.datetime.fromtimestamp(f["time"]).isoformat(timespec="seconds")
        cut = "; it lost the store and every peer (its host was cut off)" if f.get("lost_store") else ""
        lines.append(f"failure on rank {f['rank']} at {_position(f)} ({when}, attempt {f.get('attempt', 0)}): "
                     f"{f['error']}{cut}")
    lines.append("missing: " + (", ".join(f"rank {r}" for r in d["missing"]) if d["missing"] else "none named"))
    for r in d["ranks"]:
        own, beat = r["report"], r["last_heartbeat"]
        if own:
            what = {"failure": "failed", "stall": "stalled", "healed-stall": "went on after a stall"}.get(own["kind"],
                                                                                         own["kind"])
            text = f"{what} at {_position(own)} ({own.get('phase') or '?'}) in {own['where']}"
            stall = next((e for e in reversed(r["events"][:-1]) if e["kind"] == "stall"), None)
            if stall and stall["where"] != own["where"]:
                text += f", after {stall['seconds']:.0f} s without progress in {stall['where']}"
        elif r["missing"] and beat:
            text = (f"MISSING (no report of its own); last heartbeat at {_position(beat)} ({beat.get('phase') or '?'}) "
                    f"in {beat.get('where')} (pid {beat.get('pid')} on {beat.get('host')})")
        elif beat:
            text = f"no report of its own; last heartbeat at {_position(beat)} in {beat.get('where')}"
        else:
            text = "no stall or failure reported"
        if r["missing"] and own:
            text = "MISSING per " + ", ".join(f"rank {x}" for x in r["named_by"]) + "; its own report: " + text
        if r["on_demand_dumps"]:
            text += f"; {r['on_demand_dumps']} SIGUSR2 dump(s), the last in {r['on_demand_where']}"
        if r["dumps"]:
            text += f"; stacks: debug/rank-{r['rank']}.txt"
        lines.append(f"rank {r['rank']}: {text}")
    fr = d["flight_recorder"]
    if fr and "error" in fr:
        lines.append(f"flight recorder: could not be read ({fr['error']})")
    elif fr:
        parts = [(f"rank {k}: last {v['collective']} #{v['seq']} ({v['state']})"
                  + (f" from {v['from']}" if v.get("from") else "")) if v else f"rank {k}: empty"
                 for k, v in sorted(fr["ranks"].items())]
        if fr["without_dump"]:
            parts.append("no dump from " + ", ".join(f"rank {k}" for k in fr["without_dump"]))
        for c in fr["incomplete"][:3]:  # torch's matcher (when it can pair the ranks' records; --json has its error)
            if "seq" in c:
                parts.append(f"{c['collective']} #{c['seq']} lacks ranks {c['missing_ranks']}")
        if parts:
            lines.append("flight recorder (torch's reader): " + "; ".join(parts))
        lines += [f"flight recorder: {line}" for line in fr.get("refused", [])]
    return lines


def doctor_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-dist doctor",
        description="Summarise a run's debug/ directory: which rank was missing, where every rank was "
                    "(reports, stack dumps, heartbeats, Flight Recorder dumps).",
    )
    add_location_args(parser, run_dir=True, data_dir=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    try:
        result = diagnose(Path(args.run_dir))
        text = json.dumps(result, default=str, sort_keys=True) if args.json else "\n".join(render(result))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:  # a file not as we write it
        raise UserError(f"{args.run_dir}: a file of this run directory is not as mnist-dist writes it "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    print(text)
    return 0
