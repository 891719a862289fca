"""Shared test helpers: real processes, free ports, timeouts, tiny IDX files, the real MNIST; the
in-process layer (``cli``, ``isolated``); the session's shared real runs (``reference_run``), small
MNIST (``small_mnist``) and one SLURM cluster (``cluster``). How the suite is built: docs/testing.md."""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
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
    # MNIST_DIST_ALLOW_SUBSET: the small MNIST of ``small_mnist`` trains (the real files have the real
    # counts anyway; the strict default is tested in test_data.py)
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "", "MNIST_DIST_ALLOW_SUBSET": "1"})
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


def pytest_configure(config) -> None:
    workers = getattr(config.option, "numprocesses", None)
    if config.getoption("dist", "no") == "loadgroup" and workers and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError(f"pytest {pytest.__version__}: pytest-xdist's --dist loadgroup ignores the "
                                f"xdist_group marks under pytest 9; pip install 'pytest<9' (the test extra "
                                f"pins it), or run without workers (-n 0)")


def pytest_collection_finish(session) -> None:
    """Under ``--dist loadgroup`` every test of an ``xdist_group`` must carry the group in its node id
    (that is how pytest-xdist keeps a group on one worker): if a pytest/xdist pair stops doing that,
    the SLURM, Ray and Docker tests would start their cluster or image once per worker."""
    if getattr(session.config.option, "loadgroup", False):
        lost = [item.nodeid for item in session.items
                if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(f"--dist loadgroup lost the xdist_group of {len(lost)} tests (e.g. "
                                    f"{lost[0]}): pytest {pytest.__version__} with this pytest-xdist does "
                                    f"not group; install pytest<9 (the test extra pins it)")


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


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run at ``tmp_path/run`` without its summary.json: a run to resume."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "summary.json").unlink()
    return out


class CodeRunningPayload:
    """What a crafted pickle (a checkpoint, a DCP ``.metadata``) would carry: unpickling it runs
    ``touch MARKER`` through ``os.system``, so whether a reader ran it shows on disk."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, and an ``error:`` line that mentions every needle."""
    assert proc.returncode != 0, f"expected failure\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors, f"no error line in stderr:\n{proc.stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


# ---------------------------------------------------------------- small MNIST: mechanics, not accuracy
SMALL_TRAIN, SMALL_TEST = 6000, 1000  # 1,000 test images: not divisible by 3 or 7 (exact-eval checks)


def make_small_mnist(root: Path, real: Path, n_train: int = SMALL_TRAIN, n_test: int = SMALL_TEST) -> Path:
    """The first ``n_train`` / ``n_test`` images of the real MNIST as IDX files (ROOT/MNIST/raw): real
    digits, so a short run still learns (~90% in a few dozen steps), at a tenth of the epoch's cost.
    Training on it needs $MNIST_DIST_ALLOW_SUBSET=1 (``child_env`` sets it)."""
    from mnist_dist.data import mnist as data

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for train, prefix, n in ((True, "train", n_train), (False, "t10k", n_test)):
        images, labels = data.read_split(str(real), train=train)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", torch.from_numpy(images[:n].copy()))
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", torch.from_numpy(labels[:n].copy()))
    return root


def session_dir(tmp_path_factory) -> Path:
    """A directory common to the whole test session: under pytest-xdist, the parent of the workers'
    own base temp directories."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def small_mnist(mnist_root, tmp_path_factory) -> Path:
    """6,000 training and 1,000 test images of the real MNIST, for tests of mechanics (resume,
    signals, launchers) rather than of accuracy. One copy per session (shared by xdist workers, so
    that their shared runs have the same flags)."""
    from filelock import FileLock

    root = session_dir(tmp_path_factory) / "small-mnist"
    with FileLock(str(root) + ".lock"):
        if not (root / "complete").is_file():
            shutil.rmtree(root, ignore_errors=True)
            make_small_mnist(root, mnist_root)
            (root / "complete").write_text("")
    return root


# ---------------------------------------------------------------- shared real runs
class ReferenceRuns:
    """Real runs shared by every test of the session that compares against them, keyed by their
    command: the first test that asks for a run makes it, the others read it (copy it before changing
    anything in it). Under pytest-xdist the workers share the runs through a file lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, *args: str, nproc: int = 0, env: dict[str, str] | None = None, timeout: float = 300) -> Path:
        """The run directory of ``train_ddp.py *args`` (``nproc`` > 0: under torchrun with that many
        ranks), ``--out-dir`` added; made on first use. A failed run fails every test that asks for it."""
        from filelock import FileLock

        key = hashlib.sha256(json.dumps([list(args), nproc, sorted((env or {}).items())]).encode()).hexdigest()[:16]
        folder = self.root / key
        with FileLock(str(self.root / f"{key}.lock")):
            if (folder / "done").is_file():
                return folder / "run"
            if (folder / "failed").is_file():
                pytest.fail(f"the shared run failed earlier in this session:\n{(folder / 'failed').read_text()}")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            flags = [str(TRAIN_SCRIPT), *args, "--out-dir", str(folder / "run")]
            launch = torchrun(nproc, *flags, timeout=timeout, env=child_env(**(env or {}))) if nproc else \
                python(*flags, timeout=timeout, env=child_env(**(env or {})))
            (folder / "command.json").write_text(json.dumps({"args": list(args), "nproc": nproc, "env": env}))
            if launch.returncode != 0:
                (folder / "failed").write_text(f"exit {launch.returncode}\n{launch.stdout}\n{launch.stderr}")
                pytest.fail(f"shared run failed (exit {launch.returncode}):\n{launch.stdout}\n{launch.stderr}")
            (folder / "stdout.txt").write_text(launch.stdout)
            (folder / "done").write_text("")
            return folder / "run"


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory) -> ReferenceRuns:
    return ReferenceRuns(session_dir(tmp_path_factory) / "reference-runs")


@pytest.fixture(scope="session")
def trained_run(mnist_root, reference_runs) -> Path:
    """One real single-process run of the default recipe (one epoch, the real MNIST), shared by
    several tests (pictures, export, predict, evaluate and doctor read it)."""
    return reference_runs.get("--data-dir", str(mnist_root), "--no-progress")


# ---------------------------------------------------------------- the in-process layer
@dataclass
class CliResult:
    """What ``mnist_dist.cli.main(argv)`` did in this process: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def _inductor_compile_threads() -> int | None:
    module = sys.modules.get("torch._inductor.config")
    return None if module is None else module.compile_threads


@pytest.fixture
def isolated():
    """Puts back what a command run inside the pytest process changes process-wide: environment
    variables (the Flight Recorder's ``TORCH_FR_*``, ``CUBLAS_WORKSPACE_CONFIG``, ...), the cached
    fault spec, torch's threads/determinism/cuDNN/TF32 settings and RNGs, Python's and NumPy's RNGs,
    signal handlers and faulthandler's SIGUSR2, warnings filters, ``gc.freeze``, accelerate's state
    singleton, the working directory, ``sys.argv``; and fails the test if it leaves a process group or a thread behind."""
    from mnist_dist import faults
    from mnist_dist.diagnostics import flight

    env, cwd, argv = dict(os.environ), os.getcwd(), list(sys.argv)
    filters = list(warnings.filters)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                                          signal.SIGUSR2, signal.SIGHUP)}
    fault_enabled = faulthandler.is_enabled()
    cudnn = torch.backends.cudnn
    settings = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic, cudnn.benchmark,
                cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_default_dtype())
    rngs = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    flight_ours, compile_threads = dict(flight._OURS), _inductor_compile_threads()
    threads_before = set(threading.enumerate())
    faults._specs.cache_clear()
    try:
        yield
    finally:
        import torch.distributed as torch_dist

        left_group = torch_dist.is_available() and torch_dist.is_initialized()
        if left_group:
            torch_dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv[:] = argv
        warnings.filters[:] = filters
        warnings._filters_mutated()  # type: ignore[attr-defined]
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        faulthandler.unregister(signal.SIGUSR2)
        if not fault_enabled and faulthandler.is_enabled():
            faulthandler.disable()
        (threads, det, warn_only, cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32, dtype) = settings
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        flight._OURS.clear()
        flight._OURS.update(flight_ours)
        if compile_threads is not None:
            sys.modules["torch._inductor.config"].compile_threads = compile_threads
        faults._specs.cache_clear()
        if "accelerate.state" in sys.modules:  # accelerate keeps its Accelerator's state in a singleton
            sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
        gc.unfreeze()  # entry.guarded freezes the heap for a fast interpreter exit
        lingering = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()
                     and not t.daemon]
        assert not left_group, "the command left a process group behind"
        assert not lingering, f"the command left threads running: {lingering}"


@pytest.fixture
def cli(isolated, capsys) -> Callable[..., CliResult]:
    """``cli(*argv, env={...})``: ``mnist-dist ARGV`` (``python -m mnist_dist``, ``train_ddp.py``'s
    commands) run in this process, ~1 ms instead of a 2-3 s interpreter start; exit code, stdout and
    stderr as a process would give them (``SystemExit`` from argparse included). ``env`` sets variables
    for this call only. An exception a process would print as a traceback (a bug, an injected
    ``raise`` fault) propagates to the test. Process-level behaviour (signals, launchers, locks) stays in real processes."""
    from mnist_dist import cli as cli_module

    def call(*argv: str | Path, env: dict[str, str] | None = None) -> CliResult:
        from mnist_dist import faults

        extra = {"WANDB_MODE": "offline", "MNIST_DIST_ALLOW_SUBSET": "1", **(env or {})}
        before = {key: os.environ.get(key) for key in extra}
        os.environ.update(extra)
        faults._specs.cache_clear()  # read once per process: this call's $MNIST_DIST_FAULT
        capsys.readouterr()
        try:
            code = cli_module.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            faults._specs.cache_clear()
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return call


# ---------------------------------------------------------------- the local SLURM cluster (test_slurm*.py)
@pytest.fixture(scope="session")
def cluster():
    """A real 2-node SLURM cluster on this machine (tests/slurm_cluster.py), one for the whole session
    (its tests share one pytest-xdist worker: ``xdist_group("slurm")``)."""
    from slurm_cluster import SlurmCluster

    # not under pytest's tmp dir: that is mode 0700 and munged runs as the munge user
    root = Path(tempfile.mkdtemp(prefix="mnist-dist-slurm-"))
    try:
        with SlurmCluster(root, nodes=2, cpus=2, gpus_per_node=2, cred_expire=5) as c:
            yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def job_dirs(tmp_path):
    """A SLURM job's log directory and RUNS_DIR."""
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    logs.mkdir()
    runs.mkdir()
    return logs, runs
