"""The FSDP2 engine (--engine fsdp2): real torchrun processes, real gloo collectives on a CPU DeviceMesh.

One set of flags for the runs: 10 steps per epoch of the small MNIST (6,000 images, global batch
600), 2 epochs, a checkpoint every 4 steps, SGD with a constant rate (Adam would turn the float
noise of another summation order into ~1e-3 in 20 steps). The straight ddp and fsdp2 runs are
shared by the tests that compare with them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, child_env, last_json_line, ok, read_json,
                      read_jsonl, torchrun)
from test_train import check_run_dir
from mnist_dist import checkpoint

FLAGS = ("--batch-size", "600", "--epochs", "2", "--checkpoint-every", "4", "--optimizer", "sgd",
         "--schedule", "constant", "--lr", "0.05", *QUIET)
TOLERANCE = 1e-5  # largest weight difference allowed where the float summation order differs


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True, map_location="cpu")


def largest_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"parameters differ: {different}"


def train_flags(small_mnist: Path, out: Path, engine: str, *extra: str) -> list[str]:
    return [str(TRAIN_SCRIPT), "--engine", engine, *FLAGS, "--data-dir", str(small_mnist), "--out-dir", str(out),
            *extra]


@pytest.fixture
def straight(small_mnist, reference_runs):
    """engine -> the uninterrupted 2-rank run of FLAGS under that engine (shared: copy before changing)."""
    return lambda engine: reference_runs.get("--engine", engine, *FLAGS, "--data-dir", str(small_mnist), nproc=2)


# ----------------------------------------------------------------------------- in this process
@pytest.mark.parametrize("args, env, needle", [
    (["--engine", "fsdp2"], {}, "launch it with torchrun"),
    (["--engine", "ddp", "--no-reshard-after-forward"], {}, "--no-reshard-after-forward is for --engine fsdp2"),
    (["--engine", "fsdp2", "--amp", "fp16"], {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"},
     "not fp16"),
])
def test_fsdp2_refusals_are_one_line(args, env, needle, tmp_path, cli):
    """One process has no process group to shard over; the flag means nothing to an unsharded engine;
    fp16's GradScaler would judge each rank's gradient shard alone. Refused before any group exists."""
    proc = cli(*args, "--max-steps", "1", "--data-dir", tmp_path, "--out-dir", tmp_path / "run", "--no-progress",
               env=env)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)


def test_evaluation_calls_forward_equally_often_on_every_rank():
    """An FSDP2 module's forward is a collective: every rank must call it as often as the others.
    1,000 images over 3 ranks are shards of 333, 333 and 334; at 333 per batch the last rank alone
    would need a second batch. Each rank runs 2 (an empty one where its shard is done), and the
    ranks' sums are still exactly one evaluation of the 1,000 images."""
    from mnist_dist.dist import DistEnv
    from mnist_dist.metrics import evaluate
    from mnist_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("fast")
    images, labels = torch.randn(1000, 1, 28, 28), torch.randint(0, 10, (1000,))
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    cpu = torch.device("cpu")
    whole = evaluate(model, images, labels, DistEnv(0, 0, 1, 1, cpu, None), batch_size=333)
    assert calls == [333, 333, 333, 1]
    per_rank = []
    for rank in range(3):  # no process group: each rank's own sums (the all_reduce would add them)
        calls.clear()
        per_rank.append(evaluate(model, images, labels, DistEnv(rank, rank, 3, 3, cpu, None), batch_size=333))
        assert calls == ([333, 0] if rank < 2 else [333, 1]), (rank, calls)
    assert sum(r.total for r in per_rank) == whole.total == 1000
    assert sum(r.correct for r in per_rank) == whole.correct
    assert [sum(c) for c in zip(*(r.class_total for r in per_rank))] == whole.class_total
    assert abs(sum(r.loss * r.total for r in per_rank) - whole.loss * 1000) < 1e-3


# ----------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_fsdp2_matches_ddp_and_writes_the_same_full_checkpoints(straight):
    """Same seed and flags: FSDP2's reduce-scatter averages the same gradients DDP's all_reduce does, so
    after 20 steps the weights agree within 1e-5 (bitwise on this CPU: at 2 ranks the average is
    exact). Its checkpoints hold the full, unsharded state in the same format as ddp's: same keys,
    the optimizer state keyed by parameter index, the same param groups."""
    ddp, fsdp2 = straight("ddp"), straight("fsdp2")
    for out, engine in ((ddp, "ddp"), (fsdp2, "fsdp2")):
        check_run_dir(out, world_size=2, epochs=2, test_total=1000)
        assert read_json(out / "config.json")["config"]["engine"] == engine
        assert [p.name for p in checkpoint.list_checkpoints(out)] == \
            ["step-00000012.pt", "step-00000016.pt", "step-00000020.pt"]
    assert largest_difference(ddp, fsdp2) <= TOLERANCE
    a, b = (checkpoint.load(out / "checkpoints" / "step-00000016.pt") for out in (ddp, fsdp2))
    assert a["model"].keys() == b["model"].keys() == weights(ddp).keys()
    assert all(a["model"][k].shape == b["model"][k].shape for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert list(a["optimizer"]["state"]) == list(b["optimizer"]["state"]) == list(range(len(a["model"])))
    for i, state in a["optimizer"]["state"].items():
        moment = b["optimizer"]["state"][i]["momentum_buffer"]
        assert type(moment) is torch.Tensor and moment.shape == state["momentum_buffer"].shape
        assert (moment - state["momentum_buffer"]).abs().max() <= TOLERANCE
    metrics = [[m["test_correct"] for m in read_jsonl(out / "metrics.jsonl")] for out in (ddp, fsdp2)]
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_fsdp2_resume_after_a_crash_is_bitwise_exact_and_resumes_under_ddp(straight, small_mnist, tmp_path):
    """A crash at step 14 (mid-epoch 2) and --resume auto from step 12 end with the weights of the
    straight fsdp2 run, bit for bit; the same checkpoint resumes under --engine ddp too."""
    fsdp2 = straight("fsdp2")
    crashed = tmp_path / "crashed"
    failed = torchrun(2, *train_flags(small_mnist, crashed, "fsdp2"),
                      env=child_env(MNIST_DIST_FAULT="raise,rank=0,step=14"))
    assert failed.returncode != 0
    assert checkpoint.list_checkpoints(crashed)[-1].name == "step-00000012.pt"
    as_ddp = tmp_path / "as-ddp"
    shutil.copytree(crashed, as_ddp)
    resumed = ok(torchrun(2, *train_flags(small_mnist, crashed, "fsdp2", "--resume", "auto")))
    assert "step-00000012.pt at epoch 2 step 2" in resumed.stdout
    assert_bitwise_equal(fsdp2, crashed)
    assert [m["epoch"] for m in read_jsonl(crashed / "metrics.jsonl")] == [1, 2]
    ok(torchrun(2, *train_flags(small_mnist, as_ddp, "ddp", "--resume", "auto")))
    assert largest_difference(fsdp2, as_ddp) <= TOLERANCE
    assert read_json(as_ddp / "summary.json")["test_correct"] == read_json(fsdp2 / "summary.json")["test_correct"]


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp2_at_world_size_3_with_exact_evaluation(straight, small_mnist,
                                                                                   tmp_path, cli):
    """ddp's mid-epoch checkpoint of step 12, resumed under fsdp2 by 3 ranks: parameters sharded
    unevenly (16 conv filters over 3 ranks), test shards of 333/333/334 images with --eval-batch-size
    333 (one more forward on the first two ranks, or the all-gathers would hang), and the result
    counted exactly: the same correct images as one process evaluating the saved model.pt."""
    ddp = straight("ddp")
    out = tmp_path / "three"
    resumed = ok(torchrun(3, *train_flags(small_mnist, out, "fsdp2", "--eval-batch-size", "333", "--resume",
                                          str(ddp / "checkpoints" / "step-00000012.pt"), "--dist-timeout", "60")))
    assert "at epoch 2 step 2 (global step 12)" in resumed.stdout
    summary = check_run_dir(out, world_size=3, epochs=1, test_total=1000)
    assert summary["world_sizes"] == [2, 3] and summary["global_step"] == 20
    # the gradients of 600 images averaged over 3 ranks instead of 2: another summation order
    assert largest_difference(ddp, out) <= 2 * TOLERANCE
    single = last_json_line(ok(cli("evaluate", "--run-dir", out, "--data-dir", small_mnist)).stdout)
    assert single["test_total"] == 1000 and single["test_correct"] == summary["test_correct"]


@pytest.mark.slow
def test_fsdp2_gradient_accumulation_matches_and_reduces_once_per_step(straight, small_mnist, tmp_path):
    """--grad-accum 2 gives the weights of --grad-accum 1 (within 1e-5), and the profiler's trace
    shows how: two forwards per step, ONE gradient reduce-scatter per block and step (no gradient
    sync on the first micro-batch), and with --no-reshard-after-forward one all-gather per block and
    forward (the backward reuses the gathered parameters; by default it gathers them again)."""
    fsdp2 = straight("fsdp2")
    out = tmp_path / "accumulated"
    ok(torchrun(2, *train_flags(small_mnist, out, "fsdp2", "--grad-accum", "2", "--no-reshard-after-forward",
                                "--profile", "--profile-steps", "2,1,2")))
    assert read_json(out / "config.json")["grad_accum_steps"] == 2
    assert largest_difference(fsdp2, out) <= TOLERANCE
    trace = json.loads((out / "profile" / "rank-0.pt.trace.json").read_text())
    events = Counter(re.sub(r" \(.*", "", e["name"]) for e in trace["traceEvents"]
                     if str(e.get("name", "")).startswith(("FSDP::", "ProfilerStep#")))
    steps = sum(n for name, n in events.items() if name.startswith("ProfilerStep#"))
    assert steps == 2 and events["FSDP::root_pre_forward"] == 2 * steps
    forwards = events["FSDP::pre_forward"]  # per block: 4 blocks (2 conv, 2 linear) x 2 micro-batches x 2 steps
    assert forwards == 4 * 2 * steps
    assert events["FSDP::post_backward_reduce"] == forwards // 2, events
    assert events["FSDP::all_gather"] == forwards, events


@pytest.mark.slow
def test_fsdp2_batchnorm_statistics_and_warm_up_follow_ddp(small_mnist, tmp_path):
    """BatchNorm buffers are not sharded: fsdp2 broadcasts rank 0's before each step's first forward,
    as DDP does, and averages them before each evaluation. With the BatchNorm network, a warm-up
    (whose state is put back: a full-state save and load) and evaluations every 4 steps, both engines
    end with the same weights and running statistics (within 1e-5) and count the same images correct
    at every evaluation."""
    runs = {}
    for engine in ("ddp", "fsdp2"):
        runs[engine] = tmp_path / engine
        ok(torchrun(2, *train_flags(small_mnist, runs[engine], engine, "--model", "best2", "--max-steps", "10",
                                    "--warmup-steps", "2", "--eval-every", "4")))
    assert largest_difference(runs["ddp"], runs["fsdp2"]) <= TOLERANCE
    assert any("running_mean" in k for k in weights(runs["fsdp2"]))
    evaluations = [[(e["global_step"], e["test_correct"]) for e in read_jsonl(out / "evaluations.jsonl")]
                   for out in runs.values()]
    assert evaluations[0] == evaluations[1] and [s for s, _ in evaluations[0]] == [4, 8, 10]
