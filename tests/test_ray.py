"""`mnist-dist ray`: Ray Train runs our training function — a real local Ray cluster started here
(`ray start --head --block`, 2 CPUs, no GPU), real worker actors, Ray's own gloo process group, a
worker SIGKILLed mid-epoch, and Ray's own record of the run read back with ``ray.train.Result``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import QUIET, REPO, assert_one_line_error, child_env, free_port, ok, read_json, read_jsonl, run
from test_checkpoint import assert_bitwise_equal

ray_train = pytest.importorskip("ray.train", reason="Ray Train is not installed: pip install -e '.[ray]'")

# The small MNIST at batch 64: 93 steps in the one epoch, checkpoints at 30, 60, 90 and 93
FLAGS = ["--batch-size", "64", "--checkpoint-every", "30", *QUIET]
STEPS = 93
# hermetic: no token file in ~/.ray, no usage reports, no 30 s drain on shutdown; patient: on a
# busy 2-core machine starting a worker group can take longer than Ray's 60 s. (No PYTHONPATH: the
# workers get this checkout's mnist_dist from the driver, shipped with the job.)
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


def ray_env(**extra: str) -> dict[str, str]:
    return child_env(**RAY_ENV, **extra)


def launcher(*args: str, timeout: float = 600, env: dict[str, str] | None = None):
    return run([sys.executable, "-m", "mnist_dist", "ray", *args], timeout=timeout, env=env or ray_env())


pytestmark = pytest.mark.xdist_group("ray")  # one local Ray cluster: all its tests on one worker


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster with a fixed 2 CPUs, started (and stopped) by this module only: its
    own temp dir and ports, so other Ray instances on the machine are never touched."""
    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a limit
    port = free_port()
    log = open(temp / "head.log", "w")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2",
           "--num-gpus=0", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
           f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats"]
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env(),
                            start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (temp / "head.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{(temp / 'head.log').read_text()}")
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the session this fixture made, and only it
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def straight_ray_run(ray_cluster, small_mnist, tmp_path_factory) -> tuple[Path, Path, str]:
    """Two Ray workers, the default recipe, uninterrupted: (run dir, Ray storage, stdout)."""
    base = tmp_path_factory.mktemp("ray-straight")
    out, storage = base / "run", base / "storage"
    proc = ok(launcher("--num-workers", "2", "--address", ray_cluster, "--storage", str(storage),
                       "--data-dir", str(small_mnist), "--out-dir", str(out), *FLAGS))
    return out, storage, proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_ray_workers_train_to_the_target(straight_ray_run):
    out, storage, log = straight_ray_run
    summary = read_json(out / "summary.json")
    assert summary["launcher"] == "ray" and summary["world_size"] == 2
    assert summary["test_total"] == 1000 and summary["test_accuracy"] >= 0.9, summary["test_accuracy"]
    config = read_json(out / "config.json")
    assert config["backend"] == "gloo" and config["per_rank_batch"] == 32 and config["launcher"] == "ray"
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1]
    assert (out / "model.pt").is_file()
    assert log.count("epoch 1/1") == 1, "only rank 0 logs"
    # Ray's own record of the run: the metrics reported each epoch, our checkpoint file in its storage
    result = ray_train.Result.from_path(str(storage / "run"))
    assert result.metrics["epoch"] == 1 and result.metrics["test_total"] == 1000
    assert result.metrics["test_correct"] == summary["test_correct"]
    reported = [metrics["global_step"] for _, metrics in result.best_checkpoints]
    assert reported == [60, 90, 93], "every checkpoint reported; Ray keeps --keep (3) of them"
    ray_file = Path(result.checkpoint.path) / "step-00000093.pt"
    assert ray_file.read_bytes() == (out / "checkpoints" / "step-00000093.pt").read_bytes()
    assert not list((out / "checkpoints").glob(".ray-report-*")), "staging folders are removed"


def killed_and_restarted(ray_cluster: str, data_root: Path, tmp_path: Path, kill_step: int,
                         poll_s: str) -> tuple[Path, str]:
    """Two Ray workers with --max-failures 1; rank 1 SIGKILLs itself after step ``kill_step`` on the
    first attempt, in which rank 0 sleeps 0.05 s after each step (the time a full-size step takes);
    Ray's controller polls every ``poll_s`` seconds. (run dir, the whole log)"""
    out, storage = tmp_path / "run", tmp_path / "storage"
    faults = f"kill,rank=1,step={kill_step},attempt=0;delay,rank=0,seconds=0.05,attempt=0"
    proc = ok(launcher("--num-workers", "2", "--address", ray_cluster, "--storage", str(storage),
                       "--max-failures", "1", "--data-dir", str(data_root), "--out-dir", str(out), *FLAGS,
                       env=ray_env(MNIST_DIST_FAULT=faults, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=poll_s)))
    return out, proc.stdout + proc.stderr


def assert_finished_as_straight(out: Path, straight: Path) -> None:
    summary = read_json(out / "summary.json")
    assert summary["global_step"] == STEPS and summary["test_total"] == 1000
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1], "no duplicated epoch"
    assert_bitwise_equal(straight, out)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_resumes_from_its_checkpoint(straight_ray_run, ray_cluster,
                                                                       small_mnist, tmp_path):
    """Rank 1 SIGKILLs itself at step 88 on the first attempt: Ray restarts the worker group
    (--max-failures 1), which resumes from Ray's checkpoint of step 60 — bitwise as straight.

    Ray's controller takes a reported checkpoint when it next polls the workers (every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a kill ~1.5 s after the report sometimes
    came first, and the restart then had no checkpoint (one CI failure). Here the controller polls
    every 0.2 s (Ray Train hands its RAY_TRAIN_* settings from the driver to the controller) and the
    kill comes 28 steps (~1.4 s) after the report: 7 polls."""
    out, log = killed_and_restarted(ray_cluster, small_mnist, tmp_path, kill_step=88, poll_s="0.2")
    attempts = "\n".join(line for line in log.splitlines() if "ray: attempt" in line or "injected" in line)
    assert "attempt 1: resuming from Ray's checkpoint" in log and "step-00000060.pt" in log, \
        f"the attempts: {attempts or '(no restart logged)'}\n...\n{log[-3000:]}"
    assert "resumed from" in log and "at epoch 1 step 60" in log
    assert_finished_as_straight(out, straight_ray_run[0])


@pytest.mark.slow
def test_a_checkpoint_ray_had_not_registered_is_not_lost(straight_ray_run, ray_cluster, small_mnist, tmp_path):
    """Rank 1 SIGKILLs itself at step 62, two steps after the checkpoint of step 60 was written and
    reported (~0.1 s earlier), while Ray's controller polls only every 4 s: Ray has not registered that report (its
    newest is step 30, or none), but the restart still resumes from step 60 — the run directory's
    newest checkpoint, which rank 0 takes when it is newer than Ray's. (Should a poll fall in those
    few ms, Ray's own checkpoint is step 60: the same resume.)"""
    out, log = killed_and_restarted(ray_cluster, small_mnist, tmp_path, kill_step=62, poll_s="4")
    restart = [line for line in log.splitlines() if "ray: attempt 1" in line]
    assert len(restart) == 1 and "step-00000060.pt" in restart[0], f"{restart}\n...\n{log[-3000:]}"
    assert "at epoch 1 step 60" in log, log[-3000:]
    assert_finished_as_straight(out, straight_ray_run[0])


@pytest.mark.slow
def test_failures_on_a_cluster_are_one_error_line(ray_cluster, small_mnist, tmp_path):
    common = ["--address", ray_cluster, "--storage", str(tmp_path / "storage"), "--data-dir", str(small_mnist)]
    gpu = launcher("--num-workers", "2", "--use-gpu", *common, "--out-dir", str(tmp_path / "gpu"))
    assert_one_line_error(gpu, "--use-gpu", "needs 2 GPU (it has 0)", ray_cluster)
    assert gpu.returncode == 2
    # Two one-worker runs side by side (one CPU each) that fail inside the worker, where Ray's log
    # shows the worker's traceback (as torchrun's report does for a failed rank); the driver's own
    # last line then says what failed. A worker's bad input (a --resume file that does not exist,
    # checked where the workers run) is exit code 2; any other failure, once Ray's retries are
    # spent (none here), exit code 1.
    runs = {
        "resume": (["--resume", str(tmp_path / "nope.pt")], {}),
        "crash": ([], {"MNIST_DIST_FAULT": "raise,rank=0,step=3"}),
    }
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "mnist_dist", "ray", "--num-workers", "1", *common, "--out-dir",
         str(tmp_path / name), *QUIET, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ray_env(**env), cwd=REPO, stdin=subprocess.DEVNULL) for name, (extra, env) in runs.items()}
    try:
        outputs = {name: proc.communicate(timeout=600) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    last = {name: err.strip().splitlines()[-1] for name, (_, err) in outputs.items()}
    assert procs["resume"].returncode == 2, outputs["resume"][1][-3000:]
    assert last["resume"].startswith("error: rank 0: checkpoint") and last["resume"].endswith(
        "nope.pt does not exist"), last["resume"]
    assert procs["crash"].returncode == 1, outputs["crash"][1][-3000:]
    assert last["crash"].startswith("error: the Ray Train run failed (--max-failures 0): rank 0: "
                                    "RuntimeError: injected fault at step 3"), last["crash"]


def test_bad_input_before_ray_starts(mnist_root, tmp_path, cli):
    """In this process: the checks before Ray is started or reached; a real process for the address
    that no Ray cluster answers (ray.init in this process would leave Ray's state behind)."""
    out = ["--data-dir", str(mnist_root), "--out-dir", str(tmp_path / "run")]
    for args, needles in (
        (["--num-workers", "0"], ["--num-workers must be at least 1, got 0"]),
        (["--num-workers", "2", "--batch-size", "255"], ["--batch-size 255", "world size 2"]),
        (["--num-workers", "2", "--engine", "accelerate"], ["--engine accelerate cannot run under Ray"]),
        (["--num-workers", "2", "--device", "cuda"], ["--device cuda under Ray needs --use-gpu"]),
        (["--num-workers", "1", "--max-failures", "-2"], ["--max-failures"]),
    ):
        proc = cli("ray", *args, *out)
        assert_one_line_error(proc, *needles)
        assert proc.returncode == 2
    proc = launcher("--num-workers", "2", "--address", f"127.0.0.1:{free_port()}", *out, timeout=120)
    assert_one_line_error(proc, "cannot connect to the Ray cluster")
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists(), "nothing is written before the checks pass"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_use_gpu_without_gpus_is_one_error_line(mnist_root, tmp_path):
    proc = launcher("--num-workers", "2", "--use-gpu", "--data-dir", str(mnist_root),
                    "--out-dir", str(tmp_path / "run"), timeout=120)
    assert_one_line_error(proc, "--use-gpu with --num-workers 2 needs 2 GPU(s); this machine has 0")


BLOCK_RAY = """
import sys
class NoRay:  # as if Ray were not installed: every `import ray...` fails like a missing package
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
from mnist_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_ray_installed_is_one_error_line(mnist_root, tmp_path):
    proc = run([sys.executable, "-c", BLOCK_RAY, "ray", "--num-workers", "2", "--data-dir", str(mnist_root),
                "--out-dir", str(tmp_path / "run")], timeout=120, env=ray_env())
    assert_one_line_error(proc, "needs Ray Train: pip install 'mnist-dist[ray]'", "No module named 'ray'")
    assert proc.returncode == 2


def test_flags_split_between_ray_and_training():
    from mnist_dist.launchers.ray_train import split_argv

    args, train = split_argv(["--num-workers", "2", "--epochs", "3", "--address", "auto", "--",
                              "--num-workers", "4", "--loader", "dataloader"])
    assert (args.num_workers, args.address, args.max_failures, args.use_gpu) == (2, "auto", 0, False)
    assert train == ["--epochs", "3", "--num-workers", "4", "--loader", "dataloader"]
    _, train = split_argv(["--num-workers", "2", "--num", "3"])  # no abbreviations of our flags
    assert train == ["--num", "3"]
