"""How a trial runs: a real training run in its own run directory.

- ``local``: ``python -m mnist_dist train FLAGS`` as a subprocess;
- ``torchrun``: ``python -m torch.distributed.run --standalone --nproc-per-node K -m mnist_dist train FLAGS``;
- ``slurm``: the trials asked for together become one array job, ``sbatch --array=0-(n-1)``; each task
  runs ``slurm/train.sbatch`` with its trial's flags (read from ``TRIAL_DIR/args``, one per line).

Local trials run in their own session (a Ctrl-C in the terminal reaches the sweep only, which then
sends each trial one SIGTERM), with ``PR_SET_PDEATHSIG``: if the sweep dies, its trials get SIGTERM,
checkpoint and stop. A SIGTERM makes a trial save a checkpoint and exit 3 (torchrun forwards it to
its ranks); ``--resume auto`` in its flags continues it when the sweep is run again.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding mnist_dist/ (and train_ddp.py)
SBATCH_SCRIPT = PACKAGE_ROOT / "slurm" / "train.sbatch"


@dataclass
class TrialRun:
    number: int
    run_dir: Path
    args: list[str]  # train flags, --out-dir and --resume auto included
    slot: int = 0  # which of the --parallel slots (GPUs are split by slot)
    log: Path | None = None
    proc: Any = None  # subprocess.Popen (local, torchrun)
    job: str | None = None  # "ARRAYID_TASKID" (slurm)
    info: dict[str, Any] = field(default_factory=dict)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_env(threads: int | None = None, gpus: list[int] | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_ERROR_FILE"):
        env.pop(key, None)  # never a launcher's world of the sweep's own process
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env.update(extra)
    return env


class LocalLauncher:
    """python (one process) or torchrun (K processes) on this machine."""

    name = "local"

    def __init__(self, nproc: int = 1, torchrun: bool = False, threads: int | None = None,
                 gpus_per_trial: int = 0) -> None:
        self.nproc, self.torchrun, self.threads, self.gpus_per_trial = nproc, torchrun, threads, gpus_per_trial
        self.name = "torchrun" if torchrun else "local"

    def command(self, run: TrialRun) -> list[str]:
        if self.torchrun:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={self.nproc}", "-m", "mnist_dist", "train", *run.args]
        return [sys.executable, "-m", "mnist_dist", "train", *run.args]

    def start(self, runs: list[TrialRun]) -> None:
        for run in runs:
            run.log = run.run_dir / "train.log"
            gpus = (list(range(run.slot * self.gpus_per_trial, (run.slot + 1) * self.gpus_per_trial))
                    if self.gpus_per_trial else None)
            with open(run.log, "ab") as log:
                run.proc = subprocess.Popen(self.command(run), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=child_env(self.threads, gpus),
                                            start_new_session=True, preexec_fn=_set_pdeathsig)
            run.info = {"pid": run.proc.pid, "command": shlex.join(self.command(run))}

    def refresh(self, runs: list[TrialRun]) -> None:
        pass

    def finished(self, run: TrialRun) -> bool:
        return run.proc.poll() is not None

    def returncode(self, run: TrialRun) -> int | None:
        return run.proc.poll()

    def stop(self, run: TrialRun) -> None:
        """Checkpoint and stop (torchrun forwards the signal to its ranks)."""
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)

    def kill(self, run: TrialRun) -> None:
        """The last resort after stop(): the whole process group at once."""
        if run.proc.poll() is None:
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def alive_elsewhere(self, saved: dict[str, Any]) -> str | None:
        return None  # a local trial never outlives its sweep (PR_SET_PDEATHSIG)


def split_sbatch_args(text: str) -> list[str]:
    """--sbatch-args as sbatch's arguments (shell quoting); an unclosed quote is one error line."""
    try:
        return shlex.split(text)
    except ValueError as exc:  # shlex: "No closing quotation", "No escaped character"
        raise UserError(f"--sbatch-args {text!r}: {exc} (give the options as on a shell command line)") from None


class SlurmLauncher:
    """One ``sbatch --array`` per group of trials asked for together, over ``slurm/train.sbatch``."""

    name = "slurm"

    def __init__(self, sweep_dir: Path, sweep_name: str, nproc: int | None = None, sbatch_args: str = "",
                 script: Path = SBATCH_SCRIPT) -> None:
        self.dir = sweep_dir / "slurm"
        self.sweep_name, self.nproc, self.script = sweep_name, nproc, script
        self.sbatch_args = split_sbatch_args(sbatch_args)
        self.states: dict[str, str] = {}
        if not script.is_file():
            raise UserError(f"--launcher slurm: {script} not found (a checkout of the repository has it)")

    def directives(self) -> list[str]:
        """train.sbatch's own #SBATCH lines (time, cpus, signal, requeue, ...) for the array script."""
        return [line for line in self.script.read_text().splitlines() if line.startswith("#SBATCH ")]

    def start(self, runs: list[TrialRun]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        first = runs[0].number
        listing = self.dir / f"array-{first:04d}.trials"
        for run in runs:
            if any("\n" in a for a in run.args):
                raise UserError("a training flag contains a newline; the SLURM launcher cannot pass it")
            (run.run_dir / "args").write_text("".join(a + "\n" for a in run.args))
        listing.write_text("".join(f"{run.run_dir}\n" for run in runs))
        script = self.dir / f"array-{first:04d}.sbatch"
        script.write_text("\n".join([
            "#!/bin/bash",
            f"# generated by `mnist-dist sweep`: task i runs the trial on line i+1 of {listing.name}",
            "# through slurm/train.sbatch, whose #SBATCH lines follow",
            *self.directives(),
            "set -euo pipefail",
            f'TRIAL_DIR=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(listing))})',
            'mapfile -t ARGS < "$TRIAL_DIR/args"',
            'echo "[sweep] array task $SLURM_ARRAY_JOB_ID"_"$SLURM_ARRAY_TASK_ID: trial dir $TRIAL_DIR"',
            "# a task the sweep stops (stop()) is not requeued by train.sbatch: the sweep resubmits it when",
            "# it continues; a scheduler's preemption still requeues it",
            f'export NO_REQUEUE_FILE={shlex.quote(str(self.dir))}/stop-"$SLURM_ARRAY_JOB_ID"_"$SLURM_ARRAY_TASK_ID"',
            "# a rendezvous port free on this (the first) node: tasks of one array may share a host",
            'if [[ -z "${RDZV_PORT:-}" ]]; then',
            '  RDZV_PORT=$("${PYTHON:-python3}" -c \'import socket; s = socket.socket(); s.bind(("", 0)); '
            'print(s.getsockname()[1])\')',
            "  export RDZV_PORT",
            "fi",
            f'exec bash {shlex.quote(str(self.script))} "${{ARGS[@]}}"',
            "",
        ]))
        env = child_env(MNIST_DIST_ROOT=str(PACKAGE_ROOT), RUNS_DIR=str(self.dir / "runs"))
        env.setdefault("PYTHON", sys.executable)
        if self.nproc:
            env["NPROC_PER_NODE"] = str(self.nproc)
        cmd = ["sbatch", "--parsable", f"--array=0-{len(runs) - 1}", f"--job-name=sweep-{self.sweep_name}",
               f"--output={self.dir}/%A_%a.out", *self.sbatch_args, str(script)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=PACKAGE_ROOT,
                                  stdin=subprocess.DEVNULL, timeout=120)
        except FileNotFoundError:
            raise UserError("--launcher slurm: sbatch not found (run the sweep where SLURM's commands are)") from None
        except subprocess.TimeoutExpired:
            raise UserError("--launcher slurm: sbatch did not answer within 120 s (is slurmctld up?)") from None
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[:300]
            raise UserError(f"--launcher slurm: sbatch failed: {detail}")
        array_id = proc.stdout.strip().split(";")[0]
        for i, run in enumerate(runs):
            run.job = f"{array_id}_{i}"
            run.log = self.dir / f"{array_id}_{i}.out"
            run.info = {"slurm_job": run.job, "command": shlex.join(cmd)}
            self.states[run.job] = "PENDING"

    def _squeue(self, jobs: list[str]) -> dict[str, str] | None:
        """{job: state} of the jobs still in the queue; None when squeue did not answer."""
        try:
            proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(jobs)], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            return {} if "Invalid job id" in proc.stderr else None
        return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)

    def refresh(self, runs: list[TrialRun]) -> None:
        """One squeue for every running task (polled by the sweep's loop)."""
        jobs = [run.job for run in runs if run.job]
        if not jobs:
            return
        queued = self._squeue(jobs)
        if queued is None:
            return  # keep the last known states; ask again next time
        for job in jobs:
            self.states[job] = queued.get(job, "DONE")

    def finished(self, run: TrialRun) -> bool:
        return self.states.get(run.job or "", "DONE") == "DONE"

    def returncode(self, run: TrialRun) -> int | None:
        return None  # without accounting SLURM forgets exit codes; the run directory tells

    def stop(self, run: TrialRun) -> None:
        """SIGTERM to the task's steps (torchrun and its ranks): they checkpoint and stop; the marker
        keeps train.sbatch from requeueing the task (the sweep resubmits it when it continues)."""
        if run.job:
            (self.dir / f"stop-{run.job}").touch()
        subprocess.run(["scancel", "--signal=TERM", run.job or ""], capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL)

    def kill(self, run: TrialRun) -> None:
        subprocess.run(["scancel", run.job or ""], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    def alive_elsewhere(self, saved: dict[str, Any]) -> str | None:
        """The task of an earlier sweep process that is still queued or running, to follow again."""
        job = saved.get("slurm_job")
        if job and (self._squeue([job]) or {}).get(job):
            self.states[job] = "RUNNING"
            return job
        return None
