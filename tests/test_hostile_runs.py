"""Run directories under hostile but realistic use: tampered, unreadable and ill-fitting checkpoints,
two runs on one directory, a killed launcher, a full disk, signals during start-up.

Checkpoint checks run ``mnist-dist`` in this process (the ``cli`` fixture) on copies of one shared
run; what is process-level (locks held by another process, a SIGKILLed torchrun, a tmpfs that fills up,
signals, a process without CAP_DAC_OVERRIDE) runs real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, CodeRunningPayload, assert_one_line_error, child_env, copy_of, free_port, ok,
                      python, read_json)

SLOW_STEPS = "delay,rank=0,seconds=0.1"  # MNIST_DIST_FAULT: every step of rank 0 takes 0.1 s longer


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*QUIET, "--data-dir", str(data), "--out-dir", str(out), *extra]


@pytest.fixture(scope="module")
def four_checkpoints(reference_runs, small_mnist) -> Path:
    """A finished 40-step run with checkpoints at steps 10, 20, 30 and 40 (copy it before changing it)."""
    return reference_runs.get(*QUIET, "--data-dir", str(small_mnist), "--epochs", "2", "--max-steps", "40",
                              "--checkpoint-every", "10", "--keep", "0")


def resave(path: Path, change, digest: bool = True) -> None:
    """Change a checkpoint's content and write it back, with a matching sha256 (``digest``) or the old one."""
    from mnist_dist.checkpoint import content_digest

    state = torch.load(path, weights_only=True)
    change(state)
    if digest:
        state["sha256"] = content_digest({k: v for k, v in state.items() if k != "sha256"})
    torch.save(state, path)


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- checkpoints
def test_a_bit_flipped_in_a_checkpoint_is_caught_by_its_checksum(four_checkpoints, small_mnist, tmp_path, cli):
    out = copy_of(four_checkpoints, tmp_path)
    newest = out / "checkpoints" / "step-00000040.pt"

    def flip(state):
        first = next(iter(state["model"]))
        state["model"][first].view(-1)[0] += 1e-3  # a file that still unzips and loads

    resave(newest, flip, digest=False)
    explicit = cli(*args(small_mnist, tmp_path / "other", "--epochs", "2", "--max-steps", "40", "--resume", str(newest)))
    assert explicit.returncode == 2
    assert_one_line_error(explicit, "fails its sha256 check", str(newest))
    result = cli(*args(small_mnist, out, "--epochs", "2", "--max-steps", "40", "--resume", "auto"))
    assert result.returncode == 0, result.stderr
    assert "skipping unusable checkpoint" in result.stderr and "fails its sha256 check" in result.stderr
    assert "resumed from" in result.stdout and "step-00000030.pt" in result.stdout


@pytest.mark.parametrize("tamper, needle", [
    (lambda s: s.update(global_step=-5), "impossible values: global_step=-5"),
    (lambda s: s.update(epoch="one"), "impossible values: epoch='one'"),
    (lambda s: s.update(rng={"cpu": 1}), "impossible values: rng="),
])
def test_tampered_fields_are_refused_and_an_older_checkpoint_is_used(four_checkpoints, small_mnist, tmp_path, cli,
                                                                     tamper, needle):
    out = copy_of(four_checkpoints, tmp_path)
    resave(out / "checkpoints" / "step-00000040.pt", tamper)
    result = cli(*args(small_mnist, out, "--epochs", "2", "--max-steps", "40", "--resume", "auto"))
    assert result.returncode == 0, result.stderr
    assert needle in result.stderr and "step-00000030.pt" in result.stdout


def test_a_checkpoint_that_does_not_fit_the_model_falls_back_or_is_one_line(four_checkpoints, small_mnist,
                                                                            tmp_path, cli):
    out = copy_of(four_checkpoints, tmp_path)
    newest = out / "checkpoints" / "step-00000040.pt"

    def wrong_shapes(state):
        key = next(k for k, v in state["model"].items() if v.dim() == 4)
        state["model"][key] = torch.zeros(3, 3)
        moment = next(iter(state["optimizer"]["state"].values()))
        moment["exp_avg"] = torch.zeros(7)

    resave(newest, wrong_shapes)
    explicit = cli(*args(small_mnist, tmp_path / "other", "--epochs", "2", "--max-steps", "40", "--resume", str(newest)))
    assert explicit.returncode == 2
    assert_one_line_error(explicit, "does not fit this run's model or optimizer", "size mismatch")
    result = cli(*args(small_mnist, out, "--epochs", "2", "--max-steps", "40", "--resume", "auto"))
    assert result.returncode == 0, result.stderr
    assert "does not fit this run's model or optimizer" in result.stderr and "step-00000030.pt" in result.stdout

    def only_the_optimizer(state):
        moment = next(iter(state["optimizer"]["state"].values()))
        moment["exp_avg"] = torch.zeros(7)  # torch's load_state_dict checks the groups, not this

    shutil.copy(four_checkpoints / "checkpoints" / "step-00000040.pt", newest)
    resave(newest, only_the_optimizer)
    explicit = cli(*args(small_mnist, tmp_path / "third", "--epochs", "2", "--max-steps", "40", "--resume", str(newest)))
    assert_one_line_error(explicit, "optimizer state 'exp_avg' has shape (7,)")


def test_when_no_checkpoint_can_be_used_the_run_does_not_start_afresh(four_checkpoints, small_mnist, tmp_path, cli):
    out = copy_of(four_checkpoints, tmp_path)
    for path in (out / "checkpoints").iterdir():
        path.write_bytes(path.read_bytes()[:2000])
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    result = cli(*args(small_mnist, out, "--epochs", "2", "--max-steps", "40", "--resume", "auto"))
    assert result.returncode == 2
    assert_one_line_error(result, "none of the 5 checkpoint(s)", "nothing was deleted")
    assert "starting fresh" not in result.stdout
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


def test_a_malicious_checkpoint_runs_no_code_and_the_refusal_is_one_whole_line(small_mnist, tmp_path, cli):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"format": "mnist-dist-checkpoint", "model": CodeRunningPayload(marker)}, bad)
    result = cli(*args(small_mnist, tmp_path / "run", "--resume", str(bad)))
    line = assert_one_line_error(result, "a weights-only load refuses", "system", "not written by mnist-dist")
    assert "weights_only=False" not in line and not marker.exists()


def test_changing_channels_last_across_a_resume_is_refused(four_checkpoints, small_mnist, tmp_path, cli):
    out = copy_of(four_checkpoints, tmp_path)
    result = cli(*args(small_mnist, out, "--epochs", "2", "--max-steps", "40", "--resume", "auto", "--channels-last"))
    assert_one_line_error(result, "--channels-last False (now True)", "resume with the same training flags")


@pytest.mark.slow
def test_an_unreadable_checkpoint_stops_the_run_and_deletes_nothing(four_checkpoints, small_mnist, tmp_path):
    """Permission denied is not corruption: one line naming the file, nothing deleted, no fresh start
    (root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, through setpriv, obeys the mode bits)."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    out = copy_of(four_checkpoints, tmp_path)
    newest = out / "checkpoints" / "step-00000040.pt"
    newest.chmod(0)
    before = names(out)
    proc = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, str(TRAIN_SCRIPT),
                           *args(small_mnist, out, "--epochs", "2", "--max-steps", "40", "--resume", "auto")],
                          capture_output=True, text=True, env=child_env(), timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, f"cannot read checkpoint {newest}: Permission denied", "nothing was deleted")
    assert names(out) == before and "resumed" not in proc.stdout and "starting fresh" not in proc.stdout


# ----------------------------------------------------------------------------- one owner per directory
def test_a_non_empty_out_dir_needs_resume_or_overwrite(four_checkpoints, small_mnist, tmp_path, cli):
    out = copy_of(four_checkpoints, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = cli(*args(small_mnist, out, "--max-steps", "5"))
    assert result.returncode == 2
    assert_one_line_error(result, f"--out-dir {out} is not empty", "--resume auto", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before, "the refused run touched the directory"
    ok(cli(*args(small_mnist, out, "--max-steps", "5", "--overwrite")))
    assert names(out) == ["step-00000005.pt"] and read_json(out / "summary.json")["global_step"] == 5
    (out / "notes.txt").write_text("mine")
    result = cli(*args(small_mnist, out, "--max-steps", "5", "--overwrite"))
    assert_one_line_error(result, "notes.txt", "which mnist-dist did not write")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.pt").is_file()


def start_slow_run(out: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = child_env(MNIST_DIST_FAULT=SLOW_STEPS, MNIST_DIST_ALLOW_SUBSET="1")
    return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args(data, out, "--checkpoint-every", "5", *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_dead_holder_is_taken_over(small_mnist, tmp_path):
    out = tmp_path / "run"
    first = start_slow_run(out, small_mnist)
    try:
        wait_for(lambda: (out / "checkpoints" / "step-00000005.pt").exists(), 120, "the first run's checkpoint")
        second = python(str(TRAIN_SCRIPT), *args(small_mnist, out, "--overwrite"), env=child_env(), timeout=120)
        assert second.returncode == 2
        assert_one_line_error(second, f"--out-dir {out} is in use by the run of pid {first.pid} on")
        assert (out / "checkpoints" / "step-00000005.pt").exists(), "the refused run deleted the holder's files"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
        first.communicate()
    resumed = ok(python(str(TRAIN_SCRIPT), *args(small_mnist, out, "--resume", "auto"), env=child_env(),
                        timeout=300))
    assert f"taking over --out-dir {out} from the run of pid {first.pid}" in resumed.stderr
    assert "resumed from" in resumed.stdout
    assert not (out / ".owner.json").exists() and not (out / ".owner.lock").exists(), "the claim outlived the run"


@pytest.mark.slow
def test_ranks_end_promptly_when_torchrun_is_killed_and_write_nothing_after(small_mnist, tmp_path):
    out = tmp_path / "run"
    env = child_env(MNIST_DIST_FAULT=f"{SLOW_STEPS};delay,rank=1,seconds=0.1", MNIST_DIST_ALLOW_SUBSET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(TRAIN_SCRIPT),
           *args(small_mnist, out, "--checkpoint-every", "5")]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "checkpoints" / "step-00000005.pt").exists(), 120, "a checkpoint")
        ranks = [int(p) for p in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
        assert len(ranks) == 2, ranks
        agent.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and "Z" not in
                                 Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3] for pid in ranks),
                 60, "the ranks to exit")
        took = time.monotonic() - killed
        snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        time.sleep(2)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == snapshot
    finally:
        agent.kill()
    _, err = agent.communicate(timeout=30)
    assert took < 10, f"the ranks took {took:.1f} s to notice"
    for rank in (0, 1):
        assert f"[rank {rank}] error: the launcher (torchrun, pid {agent.pid}) is gone" in err, err
    assert not (out / "summary.json").exists()


# ----------------------------------------------------------------------------- a full disk
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(small_mnist, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "run"
        full = python(str(TRAIN_SCRIPT), *args(small_mnist, out, "--epochs", "2", "--max-steps", "40",
                                               "--checkpoint-every", "5", "--keep", "0"), env=child_env(), timeout=300)
        line = assert_one_line_error(full, "No space left on device", "the earlier checkpoints are intact")
        assert "cannot write checkpoint" in line and full.returncode == 2
        kept = names(out)
        assert kept and all(not n.startswith(".") for n in kept), kept
        from mnist_dist import checkpoint

        for name in kept:
            checkpoint.load(out / "checkpoints" / name)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = ok(python(str(TRAIN_SCRIPT), *args(small_mnist, out, "--epochs", "2", "--max-steps", "40",
                                                     "--checkpoint-every", "5", "--keep", "2", "--resume", "auto"),
                            env=child_env(), timeout=300))
        assert f"resumed from {out / 'checkpoints' / kept[-1]}" in resumed.stdout
        assert read_json(out / "summary.json")["global_step"] == 40
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# ----------------------------------------------------------------------------- signals from the first line
@pytest.mark.slow
def test_signals_during_a_rendezvous_that_never_completes(small_mnist, tmp_path):
    """Rank 0 of two waits for a rank 1 that never comes: SIGUSR2 dumps its stacks and it goes on
    waiting; SIGTERM ends it at once with exit 3 and one line, and leaves no directory it made."""
    out = tmp_path / "run"
    env = child_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args(small_mnist, out, "--dist-timeout", "120")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "debug" / "rank-0.txt").exists(), 60, "the stack dump file")
        time.sleep(3)  # well inside init_process_group's wait by now
        proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: (out / "debug" / "rank-0.txt").stat().st_size > 0, 10, "the stacks")
        assert "init_process_group" in (out / "debug" / "rank-0.txt").read_text() and proc.poll() is None
        (out / "debug" / "rank-0.txt").write_text("")  # as if no dump was asked for
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 3 and time.monotonic() - started < 5
    assert err.strip().splitlines() == ["[rank 0] stopped by signal SIGTERM during start-up, before training: nothing to "
                                        "checkpoint"]
    assert not out.exists(), sorted(out.rglob("*"))
