"""Shared test helpers: real processes, free ports, timeouts, tiny IDX files, the real MNIST."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train_ddp.py"
DEFAULT_SHARED = REPO.parent / "shared" / "data"
# for runs whose pictures and model.pt2 no test looks at (they cost ~4 s of rank 0's time per run;
# tests/test_outputs_extra.py and test_tracking.py check them on runs that keep them)
QUIET = ("--no-progress", "--no-plots", "--no-export")


def real_mnist_root() -> Path | None:
    """$MNIST_DATA_DIR, else ../shared/data beside the checkout, if it holds MNIST/raw."""
    for candidate in (os.environ.get("MNIST_DATA_DIR"), DEFAULT_SHARED):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = real_mnist_root()
    if root is None:
        pytest.skip("real MNIST not found: set MNIST_DATA_DIR to a directory holding MNIST/raw "
                    "(CI provides ../shared/data)")
    return root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU test's child process: GPUs hidden, so the CPU suite behaves the same
    on a GPU machine (2-rank tests would otherwise fail on one GPU, or switch to NCCL on several)."""
    env = dict(os.environ)
    # never inherit a launcher's world from an outer process
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def gpu_env(**extra: str) -> dict[str, str]:
    """The environment of a `gpu` test's child process: the GPUs this pytest process sees."""
    env = child_env(**extra)
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        env.pop("CUDA_VISIBLE_DEVICES")
    env.update(extra)
    return env


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run only where CUDA is present; elsewhere they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run(args: list[str], timeout: float = 300, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a real process; a hang becomes a test failure after ``timeout`` seconds."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=env or child_env(), cwd=cwd or REPO, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, *args], **kwargs)


def torchrun(nproc: int, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    # --standalone picks a free port itself; the explicit rdzv settings keep runs apart
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", *(extra or []), *args]
    return run(cmd, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_json_line(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in output:\n{text}"
    return json.loads(lines[-1])


# ---------------------------------------------------------------- tiny IDX files of our own
def write_idx_images(path: Path, images: torch.Tensor) -> None:
    n, rows, cols = images.shape
    header = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + rows.to_bytes(4, "big") + cols.to_bytes(4, "big")
    path.write_bytes(header + images.to(torch.uint8).numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    n = labels.shape[0]
    path.write_bytes((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.to(torch.uint8).numpy().tobytes())


def make_fake_mnist(root: Path, n_train: int = 60000, n_test: int = 10000, seed: int = 0) -> Path:
    """Random IDX files in torchvision's layout (ROOT/MNIST/raw), with the real counts by default."""
    g = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g))
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=g))
    return root


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, and an ``error:`` line that mentions every needle."""
    assert proc.returncode != 0, f"expected failure\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors, f"no error line in stderr:\n{proc.stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture(scope="session")
def trained_run(mnist_root, tmp_path_factory) -> Path:
    """One real single-process run of the default recipe (one epoch), shared by several tests."""
    out = tmp_path_factory.mktemp("runs") / "default"
    ok(python(str(TRAIN_SCRIPT), "--data-dir", str(mnist_root), "--out-dir", str(out), "--no-progress",
              timeout=300))
    return out
