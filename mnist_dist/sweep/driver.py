"""The sweep's loop: ask for trials, start them, feed their evaluations to the pruner, tell the results.

Started by ``command.sweep_command`` once the flags, the space, the storage and the launcher are set.
A SIGTERM or Ctrl-C to the sweep sends each running trial one SIGTERM (it checkpoints and exits 3),
waits for them, and leaves them RUNNING in the study; the next run of the same command finds them
(``orphans``) and resumes them from their checkpoints, or follows their SLURM tasks if still queued.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import EXIT_STOPPED, UserError
from ..outputs.rundir import atomic_write_json
from . import report
from .launchers import TrialRun
from .space import Param, flag_args

PRUNABLE = ("test_accuracy", "test_loss")  # what evaluations.jsonl reports while a trial trains
# our one-line errors (UserError, train.sbatch's die), also behind srun's "N: " label and "[rank N] "
USER_ERROR = re.compile(r"^(\d+: )?(\[rank \d+\] )?error: ")


class Sweep:
    def __init__(self, optuna: Any, study: Any, launcher: Any, args: argparse.Namespace, params: list[Param],
                 fixed: list[str], sweep_dir: Path) -> None:
        self.optuna, self.study, self.launcher, self.args = optuna, study, launcher, args
        self.params, self.fixed, self.dir = params, fixed, sweep_dir
        self.running: list[TrialRun] = []
        self.trials: dict[int, Any] = {}  # number -> optuna Trial (to report and tell)
        self.offsets: dict[int, int] = {}  # number -> bytes of evaluations.jsonl already read
        self.reported: dict[int, set[int]] = {}  # number -> steps already reported to the pruner
        self.pruning: set[int] = set()
        self.refused: list[str] = []  # trials whose flags the training job refused: never started
        self.started = 0  # trials started (or resumed) by this process
        self.signum = 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            orphans = self.orphans()
            while True:
                if self.signum:
                    return self.stop_all()
                self.poll()
                if orphans and len(self.running) < self.args.parallel:  # together: one SLURM array
                    free = self.args.parallel - len(self.running)
                    self.resume(orphans[:free])
                    orphans = orphans[free:]
                while len(self.running) < self.args.parallel and self.done() + len(self.running) < self.args.trials:
                    self.ask_and_start(self.args.parallel - len(self.running))
                if not self.running:
                    break
                time.sleep(self.args.poll)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.write_reports(final=True)
        self.check_something_ran()
        best = self.best_line()
        print(f"sweep done: {self.done()} trials in {self.dir}; {best}", flush=True)
        return 0

    def check_something_ran(self) -> None:
        """A space that yields only values the job refuses is bad input, not a finished sweep."""
        complete = self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.COMPLETE,))
        if self.refused and not self.started and not complete:
            raise UserError(f"no trial could start: the training flags refused all {len(self.refused)} trial(s) the "
                            f"--space gave, e.g. {self.refused[0]}; narrow the --space or change the fixed flags")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def done(self) -> int:
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED,
                  self.optuna.trial.TrialState.FAIL)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def free_slot(self, also_used: Sequence[TrialRun] = ()) -> int:
        used = {r.slot for r in [*self.running, *also_used]}
        return min(s for s in range(self.args.parallel + len(also_used) + 1) if s not in used)

    # ------------------------------------------------------------------ starting trials
    def trial_args(self, number: int, values: dict[str, Any]) -> list[str]:
        out = list(self.fixed)
        for p in self.params:
            out += flag_args(p.name, values[p.name])
        return out + ["--out-dir", str(report.trial_dir(self.dir, number)), "--resume", "auto"]

    def ask_and_start(self, count: int) -> None:
        from ..entry import parse_train_args

        runs = []
        for _ in range(count):
            if self.done() + len(self.running) + len(runs) >= self.args.trials:
                break
            trial = self.study.ask()
            values = {p.name: p.suggest(trial) for p in self.params}
            run = TrialRun(trial.number, report.trial_dir(self.dir, trial.number), self.trial_args(trial.number, values))
            try:  # a combination the job refuses (e.g. a batch the world size does not divide) fails here
                parse_train_args(run.args, world_size=self.args.nproc)
            except UserError as exc:
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                print(f"trial {trial.number} {values}: not started: {exc}", flush=True)
                self.refused.append(f"trial {trial.number} {values}: {exc}")
                continue
            run.run_dir.mkdir(parents=True, exist_ok=True)
            run.slot = self.free_slot(runs)
            self.trials[trial.number] = trial
            runs.append(run)
        if runs:
            self.start(runs)

    def start(self, runs: list[TrialRun], resumed: bool = False) -> None:
        self.launcher.start(runs)
        self.started += len(runs)
        for run in runs:
            self.running.append(run)
            self.save_trial_info(run, "running")
            values = self.trials[run.number].params
            print(f"trial {run.number} {'resumed' if resumed else 'started'}: {values} -> {run.run_dir}"
                  f"{f' (SLURM {run.job})' if run.job else ''}", flush=True)

    def save_trial_info(self, run: TrialRun, state: str) -> None:
        path = run.run_dir / "trial.json"
        before = json.loads(path.read_text()) if path.is_file() else {}
        starts = before.get("starts", 0) + (state == "running")
        atomic_write_json(path, {**before, "number": run.number, "state": state, "params": self.trials[run.number].params,
                                 "args": run.args, "launcher": self.launcher.name, "starts": starts,
                                 "log": str(run.log) if run.log else None, **run.info})

    def orphans(self) -> list[TrialRun]:
        """Trials an earlier sweep process left running (it was stopped): finish, follow or resume them."""
        out = []
        for frozen in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            run_dir = report.trial_dir(self.dir, frozen.number)
            trial = self.optuna.Trial(self.study, frozen._trial_id)
            self.trials[frozen.number] = trial
            info_path = run_dir / "trial.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            run = TrialRun(frozen.number, run_dir, info.get("args") or self.trial_args(frozen.number, frozen.params))
            self.reported[frozen.number] = set(frozen.intermediate_values)  # the log is re-read; these are skipped
            job = self.launcher.alive_elsewhere(info)
            if job:  # a SLURM task still in the queue: follow it
                run.job, run.info = job, {"slurm_job": job}
                run.log = Path(info["log"]) if info.get("log") else None
                run.slot = self.free_slot()
                self.running.append(run)
                print(f"trial {run.number}: following SLURM task {job} again", flush=True)
            elif report.read_summary(run_dir) is not None:
                self.finish(run)
            else:
                out.append(run)
        return out

    def resume(self, runs: list[TrialRun]) -> None:
        for i, run in enumerate(runs):
            run.run_dir.mkdir(parents=True, exist_ok=True)
            run.slot = self.free_slot(runs[:i])
        self.start(runs, resumed=True)

    # ------------------------------------------------------------------ watching trials
    def poll(self) -> None:
        self.launcher.refresh(self.running)
        for run in list(self.running):
            self.report_evaluations(run)
            if self.launcher.finished(run):
                self.report_evaluations(run)
                self.running.remove(run)
                self.finish(run)

    def report_evaluations(self, run: TrialRun) -> None:
        """New lines of the trial's evaluations.jsonl → trial.report(); pruned → stop the trial."""
        path = run.run_dir / "evaluations.jsonl"
        if self.args.metric not in PRUNABLE or run.number in self.pruning or not path.is_file():
            return
        trial = self.trials[run.number]
        with open(path, "rb") as fh:
            fh.seek(self.offsets.get(run.number, 0))
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offsets[run.number] = self.offsets.get(run.number, 0) + len(complete)
        reported = self.reported.setdefault(run.number, set())
        for line in complete.decode().splitlines():
            try:
                record = json.loads(line)
                # the pruner's step: training images seen, comparable across batch sizes
                step, value = int(record["images_seen"]), float(record[self.args.metric])
            except (ValueError, KeyError, TypeError):
                continue
            if step in reported:
                continue
            trial.report(value, step)
            reported.add(step)
            if not self.args.no_prune and trial.should_prune():
                print(f"trial {run.number}: pruned after {step} training images ({self.args.metric} {value:.4f})",
                      flush=True)
                self.pruning.add(run.number)
                self.launcher.kill(run)
                return

    def finish(self, run: TrialRun) -> None:
        states = self.optuna.trial.TrialState
        trial = self.trials[run.number]
        summary = report.read_summary(run.run_dir)
        if run.number in self.pruning:
            self.study.tell(trial, state=states.PRUNED)
            self.save_trial_info(run, "pruned")
        elif summary is not None and isinstance(summary.get(self.args.metric), (int, float)):
            value = float(summary[self.args.metric])
            self.study.tell(trial, value)
            self.save_trial_info(run, "complete")
            print(f"trial {run.number} complete: {self.args.metric} {value:.6g}; {self.best_line()}", flush=True)
        else:
            reason = self.failure(run, summary)
            self.study.tell(trial, state=states.FAIL)
            self.save_trial_info(run, "failed")
            print(f"trial {run.number} failed: {reason}", flush=True)
            if USER_ERROR.search(reason):  # bad input: every trial would fail the same way
                self.stop_all(quiet=True)
                raise UserError(f"trial {run.number} failed: {reason}")
        self.write_reports()

    def failure(self, run: TrialRun, summary: dict[str, Any] | None) -> str:
        if summary is not None:
            return f"{self.args.metric} is {summary.get(self.args.metric)!r} in {run.run_dir / 'summary.json'}"
        lines = run.log.read_text(errors="replace").splitlines() if run.log and run.log.is_file() else []
        errors = [line.strip() for line in lines if USER_ERROR.match(line)]
        code = self.launcher.returncode(run)
        where = f"(log: {run.log})"
        if errors:
            return f"{errors[-1]} {where}"
        return f"no summary.json{f', exit code {code}' if code is not None else ''} {where}"

    # ------------------------------------------------------------------ stopping and outputs
    def stop_all(self, quiet: bool = False) -> int:
        """SIGTERM to every running trial (each checkpoints and exits 3), wait, keep the study."""
        for run in self.running:
            self.launcher.stop(run)
        deadline = time.monotonic() + self.args.stop_timeout
        while self.running and time.monotonic() < deadline:
            self.launcher.refresh(self.running)
            for run in [r for r in self.running if self.launcher.finished(r)]:
                self.running.remove(run)
                self.save_trial_info(run, "interrupted")
            time.sleep(min(self.args.poll, 1.0))
        for run in self.running:
            self.launcher.kill(run)
            self.save_trial_info(run, "interrupted")
        interrupted = len(self.running)
        self.running = []
        self.write_reports(final=True)
        if not quiet:
            print(f"sweep stopped by {signal.Signals(self.signum).name}: {self.done()} finished trials kept in {self.dir}; the "
                  f"interrupted trials checkpointed{f' ({interrupted} had to be killed)' if interrupted else ''}; "
                  f"run the same command again to continue", flush=True)
        return EXIT_STOPPED

    def best_line(self) -> str:
        try:
            best = self.study.best_trial
        except ValueError:
            return "no completed trial yet"
        return f"best: trial {best.number} {self.args.metric} {best.value:.6g} {best.params}"

    def write_reports(self, final: bool = False) -> None:
        report.write_trials_csv(self.study, self.dir, [p.name for p in self.params])
        report.write_best_toml(self.study, self.dir, self.args.metric)
        if final:
            report.draw_sweep_png(self.study, self.dir)
