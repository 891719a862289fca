"""Whether the ranks share rank 0's storage: a probe file rank 0 writes, and who sees it (a collective).
Used by the sharded checkpoints (``dcp.check_shared_storage``: every rank must see it) and by the copies
across hosts (``elastic.py``: the hosts that do not keep their own)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from ..dist import broadcast_object, gather_objects


def blind_ranks(folder: Path, env: Any, hosts_only: bool = False) -> list[int]:
    """The ranks that do not see a file rank 0 has just written into ``folder`` (made if missing);
    ``hosts_only``: only each host's first rank looks, the others count as seeing it."""
    if not env.distributed:
        return []
    probe = None
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".shared-{secrets.token_hex(6)}"
        probe.write_text("")
    probe = broadcast_object(probe, env)
    seen = gather_objects((hosts_only and not env.is_local_main) or Path(probe).is_file(), env)
    env.barrier()
    if env.is_main:
        Path(probe).unlink(missing_ok=True)
    return [rank for rank, sees in enumerate(seen) if not sees]
