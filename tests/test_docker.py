"""docker/Dockerfile built and run for real on a local Docker engine (see tests/docker_engine.py).

The base is a stand-in for a PyTorch image, made here (Debian + Python + a CPU torch; no registry is
reachable) and cached by tag; the project image is built on it with ``--build-arg BASE_IMAGE`` and
run as its non-root user with the runs and data volumes mounted: 2 ranks on the CPU (entrypoint →
torchrun → gloo), ``docker stop`` mid-run (a checkpoint within the grace period) then ``--resume
auto``, and ``evaluate``. Skipped, with the reason, only where no Docker daemon can be started.
Not exercised here: GPUs (``--gpus``, NCCL), the real PyTorch base, compose and Apptainer themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, last_json_line, read_json
from docker_engine import Engine, docker, standin_base

# one engine and one image build: all these tests on one pytest-xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("docker")]

IMAGE = "mnist-dist:ci-test"
APP_UID = 1000  # the Dockerfile's default non-root user
TARGET = 0.9  # 2 epochs of the small MNIST (conftest.small_mnist), mounted as the data volume


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """Builds IMAGE on the stand-in base (both cached by the engine); returns the base's tag."""
    engine = Engine(tmp_path_factory.mktemp("dockerd"))
    if not engine.start():
        pytest.skip(engine.why_not)
    try:
        started = time.monotonic()
        base = standin_base(log=lambda msg: print(msg, flush=True))
        built = time.monotonic()
        docker("build", "-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE, ".",
               cwd=REPO, timeout=1800)
        print(f"stand-in base {base}: {built - started:.0f} s; image build: {time.monotonic() - built:.0f} s",
              flush=True)
        yield base
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, small_mnist) -> tuple[Path, Path]:
    runs = tmp_path_factory.mktemp("docker") / "runs"
    runs.mkdir()
    os.chown(runs, APP_UID, APP_UID)  # the host directory the image's user writes into
    return runs, Path(small_mnist).resolve()


def container(volumes: tuple[Path, Path], *args: str, detach: bool = False, name: str = "",
              timeout: float = 900, env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    runs, data = volumes
    cmd = ["run", "--init", "--stop-timeout", "60", "-e", "NPROC_PER_NODE=2", "-e", "WANDB_MODE=offline",
           "-e", "MNIST_DIST_ALLOW_SUBSET=1", *(arg for e in env for arg in ("-e", e)),
           "-v", f"{runs}:/workspace/runs", "-v", f"{data}:/workspace/data:ro"]
    cmd += ["-d", "--name", name] if detach else ["--rm"]
    return docker(*cmd, IMAGE, *args, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def trained(base, volumes) -> Path:
    started = time.monotonic()
    proc = container(volumes, "train", "--out-dir", "runs/two-ranks", "--epochs", "2", "--no-progress")
    print(f"2-rank training in the container: {time.monotonic() - started:.0f} s", flush=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return volumes[0] / "two-ranks"


def test_two_ranks_train_in_the_container_as_its_non_root_user(trained):
    summary = read_json(trained / "summary.json")
    assert summary["world_size"] == 2 and summary["test_total"] == 1000, summary
    assert summary["test_accuracy"] >= TARGET, summary
    # the track extra is in the image: the pictures are drawn (and model.pt2 exported)
    for name in ("curves.png", "confusion_matrix.png", "mistakes.png", "model.pt", "model.pt2"):
        assert (trained / name).is_file(), name
    owners = {p.stat().st_uid for p in trained.rglob("*")}
    assert owners == {APP_UID}, f"files on the host belong to {owners}, not the image's user {APP_UID}"


def test_evaluate_runs_in_the_container(trained, volumes):
    proc = container(volumes, "evaluate", "--run-dir", "runs/two-ranks", "--data-dir", "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json_line(proc.stdout)
    summary = read_json(trained / "summary.json")
    assert result["test_correct"] == summary["test_correct"] and result["test_total"] == 1000


def test_docker_stop_checkpoints_within_the_grace_period_and_resume_completes(base, volumes, record_property):
    runs = volumes[0]
    name = f"mnist-dist-test-{os.getpid()}-stop"
    flags = ["--out-dir", "runs/stopped", "--epochs", "4", "--checkpoint-every", "10", "--no-progress",
             "--no-plots", "--no-export"]
    ckpt_dir = runs / "stopped" / "checkpoints"
    try:
        # rank 0 sleeps 0.05 s after each step: still training when the stop comes
        started = container(volumes, "train", *flags, detach=True, name=name,
                            env=("MNIST_DIST_FAULT=delay,point=step,rank=0,seconds=0.05",))
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 600
        while not list(ckpt_dir.glob("step-*.pt")):  # training is under way
            state = docker("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
            assert state == "true", docker("logs", name, check=False).stderr[-4000:]
            assert time.monotonic() < deadline, "no checkpoint from the container"
            time.sleep(0.2)
        stop_started = time.monotonic()
        docker("stop", "-t", "60", name, timeout=120)
        stop_seconds = time.monotonic() - stop_started
        record_property("docker_stop_seconds", round(stop_seconds, 1))
        print(f"docker stop took {stop_seconds:.1f} s", flush=True)
        exit_code = int(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout)
        logs = docker("logs", name, check=False)
    finally:
        docker("rm", "-f", name, check=False)
    output = logs.stdout + logs.stderr
    assert exit_code != 137, f"killed after the grace period, not stopped:\n{output[-4000:]}"
    stopped = re.search(r"stopped by signal SIGTERM .*; checkpoint (\S+);", output)
    assert stopped, output[-4000:]
    assert (runs / Path(stopped.group(1)).relative_to("runs")).is_file()
    assert not (runs / "stopped" / "summary.json").exists()
    resumed = container(volumes, "train", *flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resumed from {stopped.group(1)}" in resumed.stdout
    summary = read_json(runs / "stopped" / "summary.json")
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= TARGET, summary


def test_a_code_change_rebuilds_only_the_code_layers(base, tmp_path):
    # the build context of the image with one line of code changed: the dependency layer (torch kept,
    # the rest installed) must come from the cache
    context = tmp_path / "context"
    context.mkdir()
    for item in ("pyproject.toml", "README.md", "train_ddp.py", "mnist_dist", "docker", ".dockerignore"):
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, context / item)
    init = context / "mnist_dist" / "__init__.py"
    init.write_text(init.read_text() + "\n# a code change\n")
    proc = docker("build", "-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={base}", "-t",
                  f"{IMAGE}-changed", ".", cwd=context, timeout=1800)
    steps = re.split(r"^Step \d+/\d+ : ", proc.stdout, flags=re.M)
    deps = next(s for s in steps if s.startswith("RUN python install-deps.py"))
    code = next(s for s in steps if s.startswith("RUN pip install --no-cache-dir --no-deps"))
    assert "Using cache" in deps and "keeping the base's" not in deps, deps
    assert "Using cache" not in code and "mnist_dist on torch" in code, code
    docker("rmi", f"{IMAGE}-changed", check=False)


def test_image_has_the_job_environment(base):
    proc = docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c",
                  "import json, os, sys, site, torch; print(json.dumps({'user_site': site.ENABLE_USER_SITE, "
                  "'nousersite': os.environ.get('PYTHONNOUSERSITE'), 'uid': os.getuid(), 'torch': torch.__version__}))")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["nousersite"] == "1" and not info["user_site"], info  # a host ~/.local cannot shadow torch
    assert info["uid"] == APP_UID, info


def test_compose_builds_the_image_and_an_unset_base_means_the_dockerfiles(base, tmp_path):
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose; .ci/run does)")
    env = {k: v for k, v in os.environ.items() if k not in ("BASE_IMAGE", "APP_UID", "APP_GID")}
    config = subprocess.run([compose, "-f", "docker/compose.yaml", "config"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert config.returncode == 0, config.stderr
    # unset, compose passes BASE_IMAGE="" ...
    assert re.search(r"^\s+BASE_IMAGE: ''$", config.stdout, re.M), config.stdout
    # ... which FROM ${BASE_IMAGE:-default} treats as unset (shown on a two-line Dockerfile: the
    # fallback is the stand-in here, since the real default cannot be pulled)
    (tmp_path / "Dockerfile").write_text(f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE:-{base}}}\n")
    docker("build", "--build-arg", "BASE_IMAGE=", "-t", f"{IMAGE}-empty-arg", str(tmp_path), timeout=300)
    docker("rmi", f"{IMAGE}-empty-arg", check=False)
    # compose's own build, on the stand-in base (the GPU reservation only matters for `up`/`run`)
    tag = f"{IMAGE}-compose"
    build = subprocess.run([compose, "-f", "docker/compose.yaml", "build"], cwd=REPO, capture_output=True,
                           text=True, timeout=1800, env={**env, "BASE_IMAGE": base, "MNIST_DIST_IMAGE": tag,
                                                         "DOCKER_BUILDKIT": "0"})
    try:
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        user = docker("image", "inspect", "-f", "{{.Config.User}}", tag).stdout.strip()
        assert user == f"{APP_UID}:{APP_UID}", user
    finally:
        docker("rmi", tag, check=False)
