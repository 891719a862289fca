"""slurm/train.sbatch's container modes on the real local SLURM cluster (see test_slurm.py), through
stand-ins: there is no Apptainer and no pyxis here. Each stand-in logs how it was called and runs the
command on the host with the image's /app mapped to this checkout, passing the host's environment
through as the real runtimes do — so a host PYTHONPATH (poisoned here: its torch refuses to import)
breaks the job unless the script's exec line cleans it. What they cannot show: Apptainer or enroot
themselves, the image's own python, GPUs (--nv)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_json
from slurm_jobs import SKIPS, data_args, explain, job_id, job_log, sbatch

pytestmark = SKIPS

CLEAN_PYTHON = "env -u PYTHONPATH PYTHONNOUSERSITE=1 python"

APPTAINER_STAND_IN = r"""#!/bin/bash
# Stand-in for `apptainer exec [--nv] [--bind A,B] [--pwd DIR] [--env K=V] IMAGE CMD...` (no Apptainer on CI):
# logs the call, then runs CMD on the host with the image's /app mapped to the checkout. The environment
# is Apptainer's: the host's passes through (PYTHONPATH included), then the image's %environment
# (docker/mnist-dist.def), then --env.
printf '%s %s\n' "${SLURMD_NODENAME:-batch}" "$*" >>"$STAND_IN_LOG"
[[ $1 == exec ]] || exit 64
shift
pwd_dir=
envs=()
while [[ $1 == --* ]]; do
  case $1 in
  --nv) shift ;;
  --bind) shift 2 ;;
  --pwd) pwd_dir=$2; shift 2 ;;
  --env) envs+=("$2"); shift 2 ;;
  *) exit 64 ;;
  esac
done
[[ -f $1 ]] || exit 65
shift
eval "$(sed -n '/^%environment/,/^%/{/^%/d;p}' "$STAND_IN_APP/docker/mnist-dist.def")"
for e in "${envs[@]}"; do export "${e?}"; done
if [[ -n $pwd_dir ]]; then cd "${pwd_dir/#\/app/$STAND_IN_APP}" || exit 66; fi
args=()
for a in "$@"; do
  a=${a/#\/app\//$STAND_IN_APP/}
  [[ $a == python ]] && a=$STAND_IN_PYTHON
  args+=("$a")
done
echo "PYTHONNOUSERSITE=${PYTHONNOUSERSITE:-} (image environment)" >>"$STAND_IN_LOG"
exec "${args[@]}"
"""

SRUN_STAND_IN = r"""#!/bin/bash
# Stand-in for srun with the pyxis plugin (no pyxis here): logs the call, drops the --container-* flags
# (the image's /app becomes the checkout, its workdir srun's --chdir) and runs the rest with the real srun.
all=$*
printf '%s\n' "${all//$'\n'/\\n}" >>"$STAND_IN_LOG" # one line per call
args=()
image=
for a in "$@"; do
  case $a in
  --container-image=*) image=${a#*=} ;;
  --container-mounts=*) ;;
  --container-workdir=*) args+=("--chdir=${a#*=}") ;;
  *) args+=("$a") ;;
  esac
done
[[ -n $image ]] || exit 64 # every srun of the job must run in the image
mapped=()
for a in "${args[@]}"; do
  a=${a/#--chdir=\/app/--chdir=$STAND_IN_APP}
  a=${a/#\/app\//$STAND_IN_APP/}
  [[ $a == python ]] && a=$STAND_IN_PYTHON
  mapped+=("$a")
done
exec "$STAND_IN_SRUN" "${mapped[@]}"
"""


def poisoned_pythonpath(tmp_path: Path) -> str:
    """A host PYTHONPATH whose torch refuses to import: it must never reach a container's python."""
    poison = tmp_path / "host-site"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text("raise ImportError('the host PYTHONPATH leaked into the container')\n")
    return str(poison)


def stand_in(tmp_path: Path, name: str, text: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text(text)
    (bindir / name).chmod(0o755)
    return bindir


@pytest.mark.slow
def test_apptainer_mode_runs_every_step_through_apptainer(cluster, job_dirs, small_mnist, tmp_path):
    logs, runs = job_dirs
    bindir = stand_in(tmp_path, "apptainer", APPTAINER_STAND_IN)
    image, calls = tmp_path / "mnist-dist.sif", tmp_path / "apptainer.calls"
    image.write_bytes(b"not a real image")
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist), "--max-steps", "20",
                  options=("--nodes=2", "--cpus-per-task=1"), timeout=300, CONTAINER_IMAGE=str(image),
                  PATH=f"{bindir}:{os.environ['PATH']}", STAND_IN_LOG=str(calls), STAND_IN_APP=str(REPO),
                  STAND_IN_PYTHON=sys.executable, PYTHONPATH=poisoned_pythonpath(tmp_path))
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    assert read_json(runs / f"slurm-{jid}" / "summary.json")["world_size"] == 2
    prefix = f"exec --nv --bind {small_mnist.resolve()},{runs.resolve()} --pwd /app {image} {CLEAN_PYTHON} -m "
    lines = calls.read_text().splitlines()
    calls_ = [line for line in lines if not line.startswith("PYTHONNOUSERSITE=")]
    download = f"{prefix}mnist_dist download --data-dir {small_mnist.resolve()}"
    assert [line.split(" ", 1)[1] for line in calls_].count(download) == 1, lines  # once, on the batch node
    for node in ("node1", "node2"):
        assert any(line.startswith(f"{node} {prefix}mnist_dist.preflight ") for line in calls_), lines
        assert any(line.startswith(f"{node} {prefix}torch.distributed.run ") and " /app/train_ddp.py " in line
                   for line in calls_), lines
    # the image's %environment sets PYTHONNOUSERSITE=1 (a host ~/.local must not shadow the image's torch)
    assert {line for line in lines if line.startswith("PYTHONNOUSERSITE=")} == {
        "PYTHONNOUSERSITE=1 (image environment)"}, lines


@pytest.mark.slow
def test_pyxis_mode_runs_every_step_in_the_image(cluster, job_dirs, small_mnist, tmp_path):
    logs, runs = job_dirs
    real_srun = shutil.which("srun")
    bindir = stand_in(tmp_path, "srun", SRUN_STAND_IN)
    calls = tmp_path / "srun.calls"
    image = "registry.example.org#mnist/mnist-dist:test"
    proc = sbatch(cluster, logs, runs, *data_args(small_mnist), "--max-steps", "10",
                  options=("--nodes=1", "--cpus-per-task=2"), timeout=300, PYXIS_IMAGE=image,
                  PATH=f"{bindir}:{os.environ['PATH']}", STAND_IN_LOG=str(calls), STAND_IN_APP=str(REPO),
                  STAND_IN_PYTHON=sys.executable, STAND_IN_SRUN=str(real_srun),
                  PYTHONPATH=poisoned_pythonpath(tmp_path))
    jid = job_id(proc)
    assert proc.returncode == 0, explain(cluster, logs, jid, proc)
    assert read_json(runs / f"slurm-{jid}" / "summary.json")["world_size"] == 1
    flags = (f"--container-image={image} --container-mounts={small_mnist.resolve()}:{small_mnist.resolve()},"
             f"{runs.resolve()}:{runs.resolve()} --container-workdir=/app")
    lines = calls.read_text().splitlines()
    assert all(flags in line for line in lines), "\n".join(lines)  # every srun runs in the image
    batch_steps = [line for line in lines if "--ntasks-per-node" not in line]  # the one-task steps
    assert [line.rsplit(" step ", 1)[1] for line in batch_steps] == [
        f"{CLEAN_PYTHON} -c import torch, mnist_dist",
        f"{CLEAN_PYTHON} -m mnist_dist download --data-dir {small_mnist.resolve()}",  # in the image, once
    ], lines
    assert any(f"{CLEAN_PYTHON} -m mnist_dist.preflight " in line for line in lines), lines
    assert any(f"{CLEAN_PYTHON} -m torch.distributed.run " in line and " /app/train_ddp.py " in line
               for line in lines), lines
    assert "SETUP" not in job_log(logs, jid)
