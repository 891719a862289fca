"""The process group is really gone after teardown: no gloo thread survives into interpreter exit.

Regression test for a crash seen in CI: a module imported after init_process_group (torchvision,
torch._dynamo and DDP import torch.distributed.nn, whose functions default to ``group=group.WORLD``)
kept the WORLD group alive, so gloo's worker threads were still releasing the last collective's
tensors while Python shut down -> "terminate called without an active exception" (SIGABRT) after a
successful run, about 1 run in 10 at 3 ranks. Thread liveness is deterministic, the abort was not,
so this test checks the threads.
"""

from __future__ import annotations

import json

import pytest

from conftest import ok, torchrun

SCRIPT = r'''
import json, os, sys
import torch
from mnist_dist import dist
from mnist_dist.config import TrainConfig

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

engine = sys.argv[1]
if engine == "accelerate":
    from mnist_dist.engines.accelerate import setup
    env = setup(TrainConfig(engine="accelerate", device="cpu"))
else:
    env = dist.setup("gloo", "cpu")
import torchvision.datasets, torch._dynamo  # noqa: E401,F401  late imports, as evaluate / --compile do
t = torch.ones(3)
torch.distributed.all_reduce(t)
env.barrier()
during = threads()
dist.teardown()
with open(os.path.join(sys.argv[2], f"rank{env.rank}.json"), "w") as f:
    json.dump({"rank": env.rank, "sum": t.tolist(), "during": during, "after": threads()}, f)
'''


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "accelerate"])
def test_no_gloo_thread_outlives_teardown(tmp_path, engine):
    if engine == "accelerate":
        pytest.importorskip("accelerate")
    script = tmp_path / "teardown_probe.py"
    script.write_text(SCRIPT)
    ok(torchrun(2, str(script), engine, str(tmp_path), timeout=180))
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        assert r["sum"] == [2.0, 2.0, 2.0]
        assert any("gloo" in name for name in r["during"]), r  # the probe sees gloo's threads ...
        assert not [name for name in r["after"] if "gloo" in name], r  # ... and none after teardown
