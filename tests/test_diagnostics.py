"""Diagnosability: a stuck or missing rank is named, stacks on demand, the start-up network
check, --profile, --tensorboard, and each epoch's memory and data-wait split.

Real torchrun processes and real signals: SIGSTOP freezes a rank exactly as a hung host would (its
heartbeat thread stops too), SIGUSR2 is what a user sends to a rank's pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (QUIET, REPO, TRAIN_SCRIPT, assert_one_line_error, child_env, free_port, ok, python,
                      read_json, read_jsonl, torchrun)

HANG_TIMEOUT = 12  # --dist-timeout of the hang tests


def start_torchrun(nproc: int, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(TRAIN_SCRIPT), *args]
    return subprocess.Popen(cmd, env=env or child_env(), cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of torchrun's worker processes, from /proc (their parent and $RANK)."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != launcher.pid:
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0])] = int(entry)
    return pids


def wait_for(path: Path, launcher: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if launcher.poll() is not None:
            out, err = launcher.communicate()
            pytest.fail(f"the job ended (exit {launcher.returncode}) before {path} appeared\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def finish(launcher: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        return launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in rank_pids(launcher).values():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                os.kill(pid, sig)
        launcher.kill()
        out, err = launcher.communicate()
        pytest.fail(f"the job did not end within {timeout} s\nstdout:\n{out}\nstderr:\n{err}")


def wait_for_complete_dumps(path: Path, count: int, timeout: float = 60) -> None:
    """Until ``path`` holds ``count`` whole dumps. A second SIGUSR2 must not come before the first
    dump has ended: faulthandler drops a signal that a second thread receives while the first thread
    is still writing (its handler is not reentrant). The main thread's section comes last in a dump
    and ends with the script's ``<module>`` frame; the pause lets the handler return after it."""
    from mnist_dist.diagnostics.stacks import parse_dumps

    deadline = time.monotonic() + timeout
    while True:
        dumps = parse_dumps(path.read_text()) if path.exists() else []
        if len(dumps) >= count and dumps[-1]["main"] and dumps[-1]["main"][0][2] == "<module>":
            time.sleep(0.5)
            return
        assert time.monotonic() < deadline, f"{path.name}: {len(dumps)} whole dump(s) after {timeout} s, not {count}"
        time.sleep(0.1)


def in_collective(where: str) -> bool:
    """Rank 0 waits for the frozen rank in the gradient all_reduce, or in the stop-flag all_reduce
    (every 10th step): either is a collective below our code."""
    return "DDP all-reduces the gradients" in where or "torch.distributed.all_reduce <- mnist_dist/" in where


def doctor(cli, run_dir: Path) -> tuple[str, dict]:
    """``mnist-dist doctor`` on a run directory, in this process: its text and its --json."""
    text = ok(cli("doctor", "--run-dir", run_dir)).stdout
    data = json.loads(ok(cli("doctor", "--run-dir", run_dir, "--json")).stdout)
    return text, data


# ----------------------------------------------------------------------------- a lost rank is named
@pytest.mark.slow
def test_sigstopped_rank_is_named_by_the_report_and_by_doctor(small_mnist, tmp_path, cli):
    """Freeze rank 1 mid-epoch: the job exits non-zero within --dist-timeout + 60 s; rank 0's report
    names rank 1 and where both were; rank 0's stacks and Flight Recorder dump are in debug/; doctor
    says the same from the files alone."""
    out = tmp_path / "run"
    # rank 0 sleeps 0.05 s after each step: the small MNIST's 3 epochs last longer than the 2 s wait
    launcher = start_torchrun(2, "--data-dir", str(small_mnist), "--out-dir", str(out), "--dist-timeout",
                              str(HANG_TIMEOUT), "--epochs", "3", "--batch-size", "64", *QUIET,
                              env=child_env(MNIST_DIST_FAULT="delay,point=step,rank=0,seconds=0.05"))
    try:
        wait_for(out / "config.json", launcher)  # written right before the first epoch starts
        time.sleep(2)
        pids = rank_pids(launcher)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = finish(launcher)
        elapsed = time.monotonic() - stopped
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, stderr
    assert elapsed < HANG_TIMEOUT + 60, f"the job took {elapsed:.0f} s after the SIGSTOP\n{stderr}"

    errors = [line for line in stderr.splitlines() if line.startswith("[rank 0] error: ")]
    assert errors and errors[0].startswith("[rank 0] error: missing: rank 1; a collective failed on rank 0"), stderr
    assert "Timed out" in errors[0] and in_collective(errors[0]), errors[0]
    assert f"rank 1 (pid {pids[1]} on " in stderr and "MISSING, last heartbeat" in stderr, stderr
    assert "python -m mnist_dist doctor --run-dir" in stderr

    report = read_json(out / "debug" / "rank-0.json")
    failure = [e for e in report["events"] if e["kind"] == "failure"][-1]
    assert failure["missing"] == [1] and failure["phase"] in ("training step", "stop-signal check"), failure
    steps_per_epoch = read_json(out / "config.json")["steps_per_epoch"]
    assert 0 < failure["step"] < steps_per_epoch, "stopped mid-epoch"
    assert failure["peers"]["1"]["pid"] == pids[1]
    # rank 0's stacks: a stall dump (90% of the timeout) taken while it waited inside backward
    from mnist_dist.diagnostics.stacks import describe, parse_dumps

    dumps = parse_dumps((out / "debug" / "rank-0.txt").read_text())
    stalls = [d for d in dumps if d["header"] and "no progress for" in d["header"]]
    assert stalls, (out / "debug" / "rank-0.txt").read_text()
    assert in_collective(describe(stalls[0]["main"])), stalls
    assert (out / "debug" / "fr_trace_rank_0").is_file(), "gloo Flight Recorder dump"

    text, data = doctor(cli, out)
    assert "missing: rank 1" in text and "rank 1: MISSING" in text, text
    assert "rank 0: failed at epoch" in text and in_collective(text), text
    assert "flight recorder (torch's reader): rank 0: last gloo:all_reduce" in text, text
    assert "no dump from rank 1" in text, text
    assert data["missing"] == [1] and not data["finished"]
    assert data["ranks"][1]["last_heartbeat"]["pid"] == pids[1]


@pytest.mark.slow
def test_monitored_barrier_names_the_rank_that_did_not_reach_the_epoch_end(small_mnist, tmp_path, cli):
    """Rank 1 sleeps past --dist-timeout after its last step (fault injection): rank 0 waits in the
    epoch-end monitored barrier, which names rank 1; rank 1, alive but stuck, dumps its own stack."""
    out = tmp_path / "run"
    env = child_env(MNIST_DIST_FAULT="delay,point=step,rank=1,step=29,seconds=11")
    proc = torchrun(2, str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(out), "--batch-size",
                    "128", "--max-steps", "29", "--stop-check-every", "1000", "--dist-timeout", "7", *QUIET,
                    env=env, timeout=300)
    assert proc.returncode != 0
    assert "[rank 0] error: missing: rank 1;" in proc.stderr and "monitoredBarrier" in proc.stderr, proc.stderr
    failure = [e for e in read_json(out / "debug" / "rank-0.json")["events"] if e["kind"] == "failure"][-1]
    assert failure["missing"] == [1] and "torch.distributed.monitored_barrier" in failure["where"], failure
    assert failure["phase"] == "epoch loop", failure
    from mnist_dist.diagnostics.stacks import describe, parse_dumps

    stuck = parse_dumps((out / "debug" / "rank-1.txt").read_text())
    assert any(d["header"] and "no progress" in d["header"] and "mnist_dist/faults.py" in describe(d["main"])
               for d in stuck), (out / "debug" / "rank-1.txt").read_text()
    text, _ = doctor(cli, out)
    assert "missing: rank 1" in text and "rank 1: MISSING per rank 0" in text, text


# ----------------------------------------------------------------------------- stacks on demand
@pytest.mark.slow
def test_sigusr2_writes_a_ranks_stacks_and_training_continues_unchanged(small_mnist, tmp_path, cli,
                                                                        reference_runs):
    """(The signalled run's rank 0 sleeps 0.05 s after each step, so that it still trains while the
    three dumps are taken; the math is the same as the plain run's.)"""
    args = ("--data-dir", str(small_mnist), "--batch-size", "64", "--epochs", "2", "--max-steps", "150", *QUIET)
    plain = reference_runs.get(*args, nproc=2)
    out = tmp_path / "signalled"
    launcher = start_torchrun(2, *args, "--out-dir", str(out),
                              env=child_env(MNIST_DIST_FAULT="delay,point=step,rank=0,seconds=0.05"))
    wait_for(out / "config.json", launcher)
    pids = rank_pids(launcher)
    from mnist_dist.diagnostics.stacks import parse_dumps

    for rank, count in ((1, 1), (1, 2), (0, 1)):
        os.kill(pids[rank], signal.SIGUSR2)
        wait_for_complete_dumps(out / "debug" / f"rank-{rank}.txt", count)
    _, stderr = finish(launcher)
    assert launcher.returncode == 0, stderr
    assert read_json(out / "summary.json")["test_correct"] == read_json(plain / "summary.json")["test_correct"]
    assert read_json(out / "summary.json")["test_loss"] == read_json(plain / "summary.json")["test_loss"]

    for rank, count in ((0, 1), (1, 2)):
        dumps = parse_dumps((out / "debug" / f"rank-{rank}.txt").read_text())
        assert len(dumps) == count and all(d["header"] is None for d in dumps), dumps
        assert all(any("/mnist_dist/" in f[0] for f in d["main"]) for d in dumps), dumps
    assert not (plain / "debug").exists(), "a run without dumps leaves no debug/"
    text, data = doctor(cli, out)
    assert "rank 1: no stall or failure reported; 2 SIGUSR2 dump(s)" in text, text
    assert data["missing"] == [] and data["finished"]

    # the start-up network check of the same runs (config.json and the log line)
    network = read_json(out / "config.json")["network"]
    assert network["backend"] == "gloo" and network["all_reduce_ok"] and network["world_size"] == 2
    assert network["busbw_gbps"] > 0 and network["latency_ms"] > 0  # 4 MiB unless one all_reduce took 0.25 s:
    assert network["bandwidth_bytes"] in [64 * 2 ** 10 * 4 ** k for k in range(4)], network  # 64 KiB .. 4 MiB
    assert [r["variable"] for r in network["ranks"]] == ["GLOO_SOCKET_IFNAME"] * 2
    assert all(r["address"] and r["host"] for r in network["ranks"]), network


@pytest.mark.slow
def test_network_check_names_the_interface_and_can_be_skipped(small_mnist, tmp_path):
    env = child_env(GLOO_SOCKET_IFNAME="lo")
    out = tmp_path / "lo"
    proc = ok(torchrun(2, str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(out),
                       "--max-steps", "3", *QUIET, env=env, timeout=300))
    line = [x for x in proc.stdout.splitlines() if x.startswith("network check: ")]
    assert len(line) == 1 and "gloo, 2 rank(s) on 1 host(s)" in line[0] and "interface lo 127.0.0.1" in line[0], proc.stdout
    ranks = read_json(out / "config.json")["network"]["ranks"]
    assert [(r["value"], r["interface"], r["address"]) for r in ranks] == [("lo", "lo", "127.0.0.1")] * 2
    skipped = tmp_path / "skipped"
    proc = ok(torchrun(2, str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(skipped),
                       "--max-steps", "3", "--skip-network-check", *QUIET, timeout=300))
    assert "network check" not in proc.stdout
    assert read_json(skipped / "config.json")["network"] == {"skipped": True}


# ----------------------------------------------------------------------------- --profile
@pytest.mark.slow
def test_profile_writes_traces_of_both_ranks_a_table_and_a_breakdown(small_mnist, tmp_path):
    out = tmp_path / "run"
    proc = ok(torchrun(2, str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(out),
                       "--max-steps", "20", "--profile", "--profile-steps", "2,2,5", *QUIET, timeout=300))
    assert "top ops by self_cpu_time_total" in proc.stdout and "Self CPU" in proc.stdout, proc.stdout
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"rank-{rank}.pt.trace.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"] if e.get("ph") == "X"}
        assert {"aten::mkldnn_convolution", "aten::addmm"} <= names, "compute events"
        assert {"gloo:all_reduce", "c10d::allreduce_"} <= names, "communication events"
        assert {"mnist/forward", "mnist/backward", "mnist/optimizer", "mnist/data"} <= names
        assert len([n for n in names if n.startswith("ProfilerStep#")]) == 5
    profile = read_json(out / "summary.json")["profile"]
    assert profile["window"] == {"wait": 2, "warmup": 2, "active": 5}
    assert profile["traces"] == ["profile/rank-0.pt.trace.json", "profile/rank-1.pt.trace.json"]
    for row in profile["per_rank"]:
        assert row["steps"] == 5 and row["step_ms"] > 0 and row["forward_ms"] > 0 and row["backward_ms"] > 0
        assert row["all_reduce_ms"] > 0 and row["allreduce_wait_ms"] >= 0 and row["optimizer_ms"] > 0
        parts = sum(row[k] for k in ("data_ms", "forward_ms", "backward_ms", "allreduce_wait_ms",
                                     "optimizer_ms", "other_ms"))
        assert parts == pytest.approx(row["step_ms"], rel=1e-6)
    # profiling changes no number: the same run without it ends with the same weights' accuracy
    plain = tmp_path / "plain"
    ok(torchrun(2, str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(plain),
                "--max-steps", "20", "--skip-network-check", *QUIET, timeout=300))
    assert read_json(plain / "summary.json")["test_loss"] == read_json(out / "summary.json")["test_loss"]


# ----------------------------------------------------------------------------- --tensorboard
@pytest.mark.slow
def test_tensorboard_event_files_match_metrics_jsonl(small_mnist, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out = tmp_path / "run"
    ok(torchrun(2, str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(out), "--epochs", "2",
                "--batch-size", "200", "--log-every", "10", "--tensorboard", "--no-progress", "--no-export",
                timeout=400))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1, "rank 0 only"
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    metrics = read_jsonl(out / "metrics.jsonl")
    numeric = {k for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"peak_memory_mb", "data_wait_seconds", "compute_seconds"} <= numeric
    assert numeric | {"batch_loss"} == set(acc.Tags()["scalars"])
    for key in numeric:
        points = [(e.step, e.value) for e in acc.Scalars(key)]
        for record in metrics:
            assert (record["global_step"], pytest.approx(record[key], rel=1e-6)) in points, key
    steps_per_epoch = read_json(out / "config.json")["steps_per_epoch"]  # 30 at batch 200
    assert [e.step for e in acc.Scalars("batch_loss")] == list(range(10, 2 * steps_per_epoch + 1, 10))
    assert all(e.value > 0 for e in acc.Scalars("batch_loss"))
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    config = read_json(out / "config.json")["config"]
    assert hparams["batch_size"].number_value == config["batch_size"] == 200
    assert hparams["model"].string_value == config["model"] and set(config) == set(hparams)
    assert set(acc.Tags()["images"]) == {"curves", "confusion_matrix", "mistakes"}
    image = acc.Images("curves")[0]
    assert image.encoded_image_string == (out / "curves.png").read_bytes()


@pytest.mark.slow
def test_tensorboard_curves_do_not_fork_after_a_crash_and_resume(small_mnist, tmp_path):
    """Killed at step 25 (checkpoint at 20), resumed: the first attempt's point at 25 is purged. (Both
    runs are real processes: TensorBoard orders the event files by name, i.e. by start second and pid,
    and a resume in the pytest process, started within the same second, got the smaller pid.)"""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = (str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(out), "--batch-size", "128",
            "--max-steps", "40", "--checkpoint-every", "10", "--log-every", "5", "--tensorboard", *QUIET)
    crashed = python(*args, env=child_env(MNIST_DIST_FAULT="kill,point=step,rank=0,step=25"), timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    first = EventAccumulator(str(next((out / "tensorboard").glob("events.out.tfevents.*"))))
    first.Reload()
    assert [e.step for e in first.Scalars("batch_loss")] == [5, 10, 15, 20, 25]
    ok(python(*args, "--resume", "auto", timeout=300))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    both = EventAccumulator(str(out / "tensorboard"))
    both.Reload()
    assert [e.step for e in both.Scalars("batch_loss")] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [e.step for e in both.Scalars("test_accuracy")] == [40]


def test_tensorboard_without_the_package_is_one_error_line(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails, as without the package
    proc = cli("--tensorboard", "--out-dir", tmp_path / "run")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--tensorboard needs the Python package 'tensorboard'", "mnist-dist[tensorboard]")


@pytest.mark.parametrize("value", ["1,2", "a,b,c", "1,2,0", "-1,0,3"])
def test_bad_profile_steps_is_one_error_line(value, tmp_path, cli):
    proc = cli("--profile", f"--profile-steps={value}", "--out-dir", tmp_path / "r")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--profile-steps must be WAIT,WARMUP,ACTIVE")


# ----------------------------------------------------------------------------- per-epoch resources
@pytest.mark.slow
def test_epoch_records_carry_peak_memory_and_the_data_wait_split(trained_run, small_mnist, tmp_path, cli):
    record = read_jsonl(trained_run / "metrics.jsonl")[-1]
    assert record["memory_kind"] == "peak_rss" and record["peak_memory_mb"] > 100  # a torch process on the CPU
    assert record["peak_memory_mb_per_rank"] == [record["peak_memory_mb"]]
    assert record["data_wait_seconds"] + record["compute_seconds"] == pytest.approx(record["epoch_seconds"])
    # the classic per-sample DataLoader waits for its data far more than the device-resident tensors
    out = tmp_path / "loader"
    ok(cli("--data-dir", small_mnist, "--out-dir", out, "--loader", "dataloader", "--num-workers", "0",
           "--max-steps", "20", *QUIET))
    loader = read_jsonl(out / "metrics.jsonl")[-1]
    assert loader["data_wait_fraction"] > 2 * record["data_wait_fraction"], (loader, record)
    text, data = doctor(cli, trained_run)
    assert "no debug/ directory" in text and data["finished"] and not (trained_run / "debug").exists()
