"""Distributed checkpoints (``--checkpoint-format dcp``): atomic directories, bitwise resumes, resharding
to other world sizes with every sample used once, asynchronous saves, the conversion to and from the
full format, and the run-directory rules (checksums, no code from a crafted ``.metadata``). Real
torchrun processes and gloo collectives; the uninterrupted reference is test_checkpoint.py's 2-rank
run in the full format, so every comparison also shows that the format does not change the math."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from conftest import CodeRunningPayload, assert_one_line_error, child_env, copy_of, ok, python, read_json, torchrun
from mnist_dist import checkpoint, dcp
from test_checkpoint import FLAGS, assert_bitwise_equal
from test_checkpoint import train_flags as train
from test_elastic import epoch_indices

DCP = ["--checkpoint-format", "dcp"]


@pytest.fixture
def straight_run(small_mnist, reference_runs) -> Path:
    """test_checkpoint.py's uninterrupted 2-rank run (the same shared run)."""
    return reference_runs.get(*FLAGS, "--data-dir", str(small_mnist), nproc=2)


@pytest.fixture
def async_run(small_mnist, reference_runs) -> Path:
    """The same 2-rank run with asynchronous DCP checkpoints (shared: copy it before changing it)."""
    return reference_runs.get(*FLAGS, *DCP, "--async-checkpoint", "--keep", "0", "--data-dir", str(small_mnist),
                              nproc=2)


@pytest.mark.slow
def test_async_dcp_checkpoints_are_complete_and_change_nothing(async_run, straight_run):
    assert_bitwise_equal(async_run, straight_run)
    names = [p.name for p in checkpoint.list_checkpoints(async_run)]
    assert names == [f"step-{s:08d}" for s in (5, 10, 15, 20, 25, 30)], names
    assert not list((async_run / "checkpoints").glob(".*")), "a temporary directory was left"
    state = checkpoint.load(async_run / "checkpoints" / "step-00000015")
    assert state["global_step"] == 15 and len(state["rng"]) == 2 and state["dcp"]
    files = {p.name for p in (async_run / "checkpoints" / "step-00000015").iterdir()}
    assert {".metadata", "run.pt", "checksums.json"} <= files and any(f.endswith(".distcp") for f in files)


@pytest.mark.slow
def test_killed_mid_save_resumes_bitwise_from_the_last_complete_directory(small_mnist, straight_run, tmp_path):
    out = tmp_path / "run"
    killed = torchrun(2, *train(small_mnist, out, *DCP),
                      env=child_env(MNIST_DIST_FAULT="kill,point=checkpoint-rename,rank=0,step=20"))
    assert killed.returncode != 0
    assert [p.name for p in checkpoint.list_checkpoints(out)][-1] == "step-00000015"
    assert (out / "checkpoints" / ".step-00000020.dcp-tmp").is_dir(), "the writer died before its rename"
    resumed = ok(torchrun(2, *train(small_mnist, out, *DCP, "--resume", "auto")))
    assert "resumed from" in resumed.stdout and "step-00000015" in resumed.stdout
    assert not list((out / "checkpoints").glob(".*")), "the incomplete directory was not cleaned up"
    assert_bitwise_equal(out, straight_run)


@pytest.mark.slow
@pytest.mark.parametrize("before, after, batch, engine", [(2, 1, "400", "ddp"), (1, 2, "400", "ddp"),
                                                          (2, 3, "384", "fsdp2")])
def test_a_mid_epoch_dcp_checkpoint_resumes_at_another_world_size(small_mnist, tmp_path, before, after, batch,
                                                                  engine):
    """Stopped mid-epoch at step 7 (the checkpoint of step 5), resumed at another world size: over the
    epoch every index is used exactly once (bar the ones drop_last leaves out), and the run finishes.
    Under fsdp2 each rank wrote its own shards, which the resume reshards over 3 ranks."""
    out, first, second = tmp_path / "run", tmp_path / "first", tmp_path / "second"
    common = [*DCP, "--batch-size", batch, "--engine", engine]
    steps = 6000 // int(batch)
    crashed = torchrun(before, *train(small_mnist, out, *common),
                     env=child_env(MNIST_DIST_FAULT="raise,rank=0,step=7", MNIST_DIST_INDEX_LOG=str(first)))
    assert crashed.returncode != 0
    resumed = ok(torchrun(after, *train(small_mnist, out, *common, "--resume", "auto"),
                        env=child_env(MNIST_DIST_INDEX_LOG=str(second))))
    assert "at epoch 1 step 5 (global step 5)" in resumed.stdout
    used = epoch_indices(first, before, 0, range(0, 5)) + epoch_indices(second, after, 0, range(5, steps))
    assert len(used) == len(set(used)) == steps * int(batch), "an index was used twice or not at all"
    summary = read_json(out / "summary.json")
    assert summary["world_sizes"] == [before, after] and summary["global_step"] == 2 * steps


def test_async_checkpoint_needs_dcp(small_mnist, tmp_path, cli):
    result = cli(*train(small_mnist, tmp_path / "run", "--async-checkpoint")[1:])
    assert_one_line_error(result, "--async-checkpoint needs --checkpoint-format dcp")


@pytest.mark.slow
def test_a_changed_shard_is_caught_by_the_checksums(async_run, small_mnist, tmp_path):
    out = copy_of(async_run, tmp_path)
    newest = out / "checkpoints" / "step-00000030"
    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = ok(torchrun(2, *train(small_mnist, out, *DCP, "--resume", "auto")))
    assert f"{shard.name} failed the sha256 check" in proc.stderr and "step-00000025" in proc.stdout


@pytest.mark.slow
def test_a_crafted_metadata_runs_no_code(async_run, small_mnist, tmp_path):
    """torch's own reader runs the payload of a crafted .metadata; ours refuses it, in one line."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "step-00000030"
    shutil.copytree(async_run / "checkpoints" / "step-00000030", folder)
    (folder / ".metadata").write_bytes(pickle.dumps(CodeRunningPayload(marker)))
    sums = json.loads((folder / "checksums.json").read_text())  # an attacker rewrites those too
    sums[".metadata"] = dcp.file_digests(folder, [".metadata"])[".metadata"]
    (folder / "checksums.json").write_text(json.dumps(sums))
    proc = python(*train(small_mnist, tmp_path / "run", *DCP, "--resume", str(folder)))
    assert_one_line_error(proc, f"checkpoint {folder} is corrupt", "posix.system")
    assert not marker.exists(), "our reader ran the payload"
    from torch.distributed.checkpoint import FileSystemReader

    with pytest.raises(AttributeError):  # os.system's return value is no Metadata: too late, it ran
        FileSystemReader(str(folder)).read_metadata()
    assert marker.exists(), "the crafted file would not have run code anyway: the test proves nothing"


@pytest.mark.slow
def test_convert_between_the_formats_and_resume_either(async_run, straight_run, small_mnist, tmp_path, cli):
    full = tmp_path / "step-15.pt"
    ok(cli("checkpoint", "convert", async_run / "checkpoints" / "step-00000015", full))
    state = checkpoint.load(full)
    assert state["format"] == checkpoint.FORMAT and state["version"] == checkpoint.VERSION and "dcp" not in state
    back = tmp_path / "step-15"
    ok(cli("checkpoint", "convert", full, back))
    for source, fmt in ((full, []), (back, DCP)):
        out = tmp_path / f"from-{source.name}"
        ok(torchrun(2, *train(small_mnist, out, *fmt, "--resume", str(source))))
        assert_bitwise_equal(out, straight_run)
    assert_one_line_error(cli("checkpoint", "convert", full, back), f"{back} exists")
