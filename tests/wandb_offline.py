"""Read back what an offline wandb run recorded, with no server: the ``run-<id>.wandb`` file.

The file is wandb's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then
LevelDB-log framing (32 KiB blocks; each chunk has a 7-byte header: crc32, length, type FULL/FIRST/
MIDDLE/LAST) around serialized ``wandb.proto.wandb_internal_pb2.Record`` messages. (``wandb.Api``
is online-only, and wandb 0.31 no longer ships a Python reader.)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a wandb transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exited: bool = False


def read_offline_run(wandb_file: Path) -> OfflineRun:
    run = OfflineRun()
    for record in records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.name, run.group, run.tags = record.run.display_name, record.run.run_group, list(record.run.tags)
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            art = record.artifact
            run.artifacts.append({"name": art.name, "type": art.type,
                                  "files": sorted(e.path for e in art.manifest.contents)})
        elif kind == "exit":
            run.exited = True
    return run


def offline_runs(run_dir: Path) -> list[Path]:
    """Every ``run-<id>.wandb`` under RUN_DIR/wandb/offline-run-*/."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
