"""``python -m mnist_dist sweep``: real Optuna studies whose trials are real training runs.

- bad input is one ``error:`` line (empty space, unknown flag, oversubscribing --parallel, ...);
- a 4-trial local sweep, 2 trials in parallel: a deliberately bad learning rate is pruned from its
  mid-epoch accuracies; SIGTERM to the sweep makes the running trials checkpoint and keeps the finished
  ones; the same command again resumes the interrupted trials and completes the study;
- the torchrun launcher (2 ranks per trial, all trials in one wandb group);
- the SLURM launcher: a 2-task array over slurm/train.sbatch on the local test cluster, stopped by
  SIGTERM and resumed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET, REPO, assert_one_line_error, child_env, ok, python, read_json, read_jsonl
from slurm_jobs import on_the_cluster

from mnist_dist.dist import usable_cpu_count
from mnist_dist.errors import UserError

optuna = pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install -e '.[sweep]'")

SWEEP = ("-m", "mnist_dist", "sweep")


def load_study(sweep_dir: Path, journal: bool = False):
    if journal:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    else:
        storage = f"sqlite:///{sweep_dir / 'study.db'}"
    return optuna.load_study(study_name=sweep_dir.name, storage=storage)


def states(study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def sigterm_when_ready(cmd: list[str], env: dict[str, str], log_path: Path, ready, details, poll: float) -> int:
    """Start the sweep ``cmd`` (output in ``log_path``), wait until ``ready()`` holds, SIGTERM it and
    return its exit code. Fails, with ``details()``, if it ends first or is not ready within 400 s."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while not ready():
            assert proc.poll() is None, f"the sweep ended early ({proc.returncode}):\n{details()}"
            assert time.monotonic() < deadline, f"not ready after 400 s:\n{details()}"
            time.sleep(poll)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_sweep_input_is_one_error_line(tmp_path, cli, monkeypatch):
    space = tmp_path / "space.toml"
    space.write_text("[lr]\nlow = 0.001\nhigh = 0.01\nlog = true\n")
    base = ["sweep", "--sweep-dir", str(tmp_path / "s"), "--trials", "2"]

    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing to sweep\n")
    assert_one_line_error(cli(*base, "--space", str(empty)), "the space is empty")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[learning-rate]\nlow = 0.001\nhigh = 0.01\n")
    assert_one_line_error(cli(*base, "--space", str(unknown)), "unknown flag 'learning-rate'")
    for text, needle in (("[lr]\nlow = 0.1\nhigh = 0.01\n", "needs low < high"),
                         ("[lr]\nlow = 0.0\nhigh = 0.01\nlog = true\n", "log scale needs low > 0"),
                         ("[epochs]\nlow = 1.5\nhigh = 3\n", "low must be an int"),
                         ("[optimizer]\nlow = 1\nhigh = 2\n", "give choices"),
                         ("[augment]\nchoices = [true, 1]\n", "choices must be bool values"),
                         ("[out-dir]\nchoices = [\"a\"]\n", "cannot be swept"),
                         ("[lr]\nlow = 0.001\nhigh = 0.01\nlgo = true\n", "unknown keys lgo")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        assert_one_line_error(cli(*base, "--space", str(bad)), needle)
    too_many = usable_cpu_count() + 1
    assert_one_line_error(cli(*base, "--space", str(space), "--parallel", str(too_many)),
                          f"--parallel {too_many}", "CPU cores")
    assert_one_line_error(cli(*base, "--space", str(space), "--lr", "0.01"), "--lr is both a fixed flag")
    assert_one_line_error(cli(*base, "--space", str(space), "--out-dir", "x"), "--out-dir is set by the sweep")
    assert_one_line_error(cli(*base, "--space", str(space), "--epochs", "0"), "--epochs must be a positive")
    assert_one_line_error(cli(*base, "--space", str(space), "--nproc", "2"), "--nproc > 1 needs --launcher")
    assert_one_line_error(cli(*base, "--space", str(space), "--trials", "0"), "--trials must be >= 1")
    # (more cases in test_bad_enqueue_sweep_dir_and_sbatch_args_are_one_error_line; a real process in
    # test_a_trial_with_bad_input_stops_the_sweep_with_its_error_line)
    enqueue = tmp_path / "first.toml"
    enqueue.write_text("trial = 5\n")  # was a TypeError traceback
    proc = cli(*base, "--space", str(space), "--enqueue", str(enqueue))
    assert proc.returncode == 2 and assert_one_line_error(proc, "expected only [[trial]] tables")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = cli("sweep", "--space", str(space), "--sweep-dir", str(not_a_dir / "s"))  # was a traceback
    assert proc.returncode == 2 and assert_one_line_error(proc, f"--sweep-dir {not_a_dir / 's'}: cannot create it")
    # without Optuna installed: one line saying which extra to install
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails, as without the extra
    assert_one_line_error(cli("sweep", "--sweep-dir", tmp_path / "s", "--space", space), "needs Optuna",
                          ".[sweep]")
    # nothing was started: no study, no trial directory
    assert not list((tmp_path / "s").glob("trial-*"))


def test_bad_enqueue_sweep_dir_and_sbatch_args_are_one_error_line(tmp_path):
    """Each of these was a traceback, or an Optuna error once the study existed: now one UserError line
    (the CLI prints it as ``error: ...``, exit 2) naming the file or flag, before any trial starts."""
    from mnist_dist.sweep.command import sweep_command

    space = tmp_path / "space.toml"
    space.write_text('[lr]\nlow = 0.001\nhigh = 0.01\nlog = true\n\n[optimizer]\nchoices = ["adam", "sgd"]\n')
    sweep_dir = tmp_path / "s"

    def error(*argv: str, where: Path = sweep_dir) -> str:
        with pytest.raises(UserError) as info:
            sweep_command(["--space", str(space), "--sweep-dir", str(where), "--trials", "1", *argv])
        assert "\n" not in str(info.value), str(info.value)
        return str(info.value)

    enqueue = tmp_path / "first.toml"
    for text, needle in (("trial = 5\n", "expected only [[trial]] tables"),
                         ("trial = [5]\n", "expected only [[trial]] tables"),
                         ("[trial]\nlr = 0.005\n", "expected only [[trial]] tables"),
                         ('[[trial]]\nlr = "x"\n', "trial 1: lr (expected finite float, got str 'x')"),
                         ("[[trial]]\nlr = 0.005\n[[trial]]\nlr = nan\n", "trial 2: lr (expected finite float"),
                         ('[[trial]]\nlr = 0.5\noptimizer = "adamw"\n', "'adamw' is not one of the choices"),
                         ("[[trial]]\nepochs = 2\n", "epochs is not in the --space")):
        enqueue.write_text(text)
        assert needle in error("--enqueue", str(enqueue)), text
        assert not sweep_dir.exists()  # checked before the study exists (Optuna raised only after)
    assert "No closing quotation" in error("--launcher", "slurm", "--sbatch-args=--partition='gpu")
    assert not sweep_dir.exists()

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert error(where=a_file / "s").startswith(f"--sweep-dir {a_file / 's'}: cannot create it")
    assert error(where=a_file) == f"--sweep-dir {a_file}: exists and is not a directory"
    for text, needle in (("{not json", "sweep.json: not valid JSON"), ("[1, 2]", "expected a JSON object")):
        (sweep_dir / "sweep.json").parent.mkdir(exist_ok=True)
        (sweep_dir / "sweep.json").write_text(text)
        line = error()
        assert line.startswith(str(sweep_dir / "sweep.json")) and needle in line, line
    assert not (sweep_dir / "study.db").exists()


def test_sweep_help_states_real_defaults():
    from mnist_dist.sweep.command import build_parser

    text = build_parser().format_help()
    assert "(default: None)" not in text and "default 20" in text
    assert "--sbatch-args=--partition=gpu" in " ".join(text.split())  # the example stays whole


def test_grad_accum_takes_ints_in_a_space_and_nan_is_no_number(tmp_path):
    from mnist_dist.sweep.space import flag_args, load_space

    space = tmp_path / "space.toml"
    space.write_text('[grad-accum]\nchoices = [1, 2, "auto"]\n')
    (param,) = load_space(space)
    assert param.choices == ("1", "2", "auto") and flag_args("grad_accum", "2") == ["--grad-accum", "2"]
    for text, needle in (("[grad-accum]\nchoices = [0, 2]\n", "choices must be 'auto' or a positive int values"),
                         ("[grad-accum]\nchoices = [true]\n", "choices must be 'auto' or a positive int values"),
                         ("[lr]\nchoices = [0.01, nan]\n", "choices must be finite float values"),
                         ("[lr]\nlow = nan\nhigh = 0.01\n", "low must be a finite number"),
                         ("[lr]\nlow = 0.001\nhigh = 0.01\nstep = nan\n", "step must be a finite number")):
        space.write_text(text)
        with pytest.raises(UserError, match=needle):
            load_space(space)


def test_a_resumed_study_draws_new_trials_not_its_first_ones_again(tmp_path):
    """The sweep's study opened twice in one directory (as by a stopped and re-run sweep): the second
    session's trials are new draws. Seeding its sampler as at the start repeated trials 1-4 of the best-
    recipe sweep as trials 6-9 (TPE's first trials are random draws from the seeded generator)."""
    from mnist_dist.sweep.command import build_parser, open_study

    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    args = build_parser().parse_args(["--space", "unused.toml", "--sweep-dir", str(sweep_dir)])
    args.direction = "maximize"

    def draw(n: int) -> list[float]:
        study = open_study(optuna, args, [], [], sweep_dir, "s")
        values = []
        for _ in range(n):
            trial = study.ask()
            values.append(trial.suggest_float("lr", 1e-4, 1e-1, log=True))
            study.tell(trial, values[-1])
        return values

    first, second = draw(4), draw(4)
    assert len(set(first + second)) == 8, (first, second)
    assert [t.params["lr"] for t in load_study(sweep_dir).get_trials()] == first + second  # one study
    again = tmp_path / "again"  # and the same sweep started afresh still draws the same first trials
    again.mkdir()
    args.sweep_dir = str(again)
    fresh = open_study(optuna, args, [], [], again, "again").ask()
    assert fresh.suggest_float("lr", 1e-4, 1e-1, log=True) == first[0]


@pytest.mark.slow
def test_local_sweep_prunes_stops_on_sigterm_and_resumes(small_mnist, tmp_path):
    """4 trials, 2 at a time, on the small MNIST at batch 64 (93 steps per epoch). Trials 0 and 3 are
    short twins (40 steps), trial 1 the same learning rate for 200 steps (so its accuracies equal the
    completed twin's and it is never pruned), trial 2 a deliberately bad learning rate: pruned at its
    first evaluations against the median of trial 0. SIGTERM once trial 0 is complete and trial 1 is
    past step 40 (in the first session rank 0 of every trial sleeps 0.05 s after each step, so trial 1
    is still training then); then the same command again."""
    if usable_cpu_count() < 2:
        pytest.skip("needs 2 usable CPU cores for 2 parallel trials")
    space = tmp_path / "space.toml"
    space.write_text("[lr]\nlow = 0.003\nhigh = 0.03\nlog = true\n\n[max-steps]\nlow = 20\nhigh = 400\n")
    enqueue = tmp_path / "first.toml"
    enqueue.write_text("".join(f"[[trial]]\nlr = {lr}\nmax-steps = {steps}\n\n"
                               for lr, steps in ((0.01, 40), (0.01, 200), (5.0, 40), (0.01, 40))))
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, *SWEEP, "--space", str(space), "--trials", "4", "--parallel", "2",
           "--sweep-dir", str(sweep_dir), "--enqueue", str(enqueue), "--prune-startup", "1", "--poll", "0.5",
           "--data-dir", str(small_mnist), "--schedule", "constant", "--eval-every", "10", "--batch-size", "64",
           "--epochs", "3", *QUIET]
    first_log = tmp_path / "first.log"
    t1_evals = sweep_dir / "trial-0001" / "evaluations.jsonl"
    t0_info = sweep_dir / "trial-0000" / "trial.json"

    def trial_0_done_and_trial_1_past_step_40() -> bool:
        return (t0_info.is_file() and read_json(t0_info)["state"] == "complete" and t1_evals.is_file()
                and max((e["global_step"] for e in read_jsonl(t1_evals)), default=0) > 40)

    rc = sigterm_when_ready(cmd, child_env(MNIST_DIST_FAULT="delay,point=step,rank=0,seconds=0.05"), first_log,
                            trial_0_done_and_trial_1_past_step_40,
                            first_log.read_text, poll=0.5)
    out = first_log.read_text()
    assert rc == 3, out
    assert "sweep stopped by SIGTERM" in out and "Traceback" not in out, out
    study = load_study(sweep_dir)
    st = states(study)
    assert st[0] == "COMPLETE" and st[1] == "RUNNING", (st, out)
    assert list((sweep_dir / "trial-0001" / "checkpoints").glob("*.pt")), "the interrupted trial did not checkpoint"
    assert read_json(sweep_dir / "trial-0001" / "trial.json")["state"] == "interrupted"
    t0_summary = (sweep_dir / "trial-0000" / "summary.json").stat().st_mtime_ns

    # the same command again: the study continues
    second = ok(subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=600,
                               stdin=subprocess.DEVNULL))
    assert "sweep done: 4 trials" in second.stdout, second.stdout
    study = load_study(sweep_dir)
    st = states(study)
    assert st == {0: "COMPLETE", 1: "COMPLETE", 2: "PRUNED", 3: "COMPLETE"}, (st, out, second.stdout)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[2].params["lr"] == 5.0 and max(trials[2].intermediate_values.values()) < 0.5
    # trial 0 was not run again; trial 1 resumed from its checkpoint and finished its 200 steps
    assert (sweep_dir / "trial-0000" / "summary.json").stat().st_mtime_ns == t0_summary
    assert read_json(sweep_dir / "trial-0000" / "trial.json")["starts"] == 1
    assert read_json(sweep_dir / "trial-0001" / "trial.json")["starts"] == 2
    assert "resumed from" in (sweep_dir / "trial-0001" / "train.log").read_text()
    s1 = read_json(sweep_dir / "trial-0001" / "summary.json")
    assert s1["global_step"] == 200 and trials[1].value == s1["test_accuracy"]
    # the twins 0 and 3 trained identically; trial 1 matched them up to step 40
    assert trials[0].value == trials[3].value
    assert trials[1].intermediate_values[40 * 64] == trials[0].intermediate_values[40 * 64]
    assert sorted(trials[0].intermediate_values) == [k * 10 * 64 for k in (1, 2, 3, 4)]  # images seen

    # outputs: trials.csv, best.toml (a --config reproducing the best trial's config), sweep.png
    rows = (sweep_dir / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,value,lr,max_steps,test_accuracy") and len(rows) == 5
    assert rows[3].split(",")[1] == "PRUNED"
    from mnist_dist.entry import parse_train_args

    best = study.best_trial
    cfg = parse_train_args(["--config", str(sweep_dir / "best.toml"), "--out-dir", str(tmp_path / "again")],
                           world_size=1)
    trial_cfg = read_json(sweep_dir / f"trial-{best.number:04d}" / "config.json")["config"]
    got = cfg.to_json()
    assert {k: got[k] for k in trial_cfg if k not in ("out_dir", "resume", "data_dir")} == \
        {k: v for k, v in trial_cfg.items() if k not in ("out_dir", "resume", "data_dir")}
    assert cfg.lr == best.params["lr"] and cfg.max_steps == best.params["max_steps"]
    png = (sweep_dir / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.slow
def test_torchrun_launcher_and_wandb_group(small_mnist, tmp_path):
    """One trial of 2 ranks under torchrun; with --wandb every trial joins the group sweep-<name>."""
    space = tmp_path / "space.toml"
    space.write_text("[lr]\nchoices = [0.01]\n")
    sweep_dir = tmp_path / "tr"
    proc = ok(python(*SWEEP, "--space", str(space), "--trials", "1", "--launcher", "torchrun", "--nproc", "2",
                     "--sweep-dir", str(sweep_dir), "--data-dir", str(small_mnist), "--max-steps", "20",
                     "--wandb", "--wandb-mode", "disabled", *QUIET, timeout=400))
    assert "sweep done: 1 trials" in proc.stdout, proc.stdout
    run = sweep_dir / "trial-0000"
    meta = read_json(run / "config.json")
    assert meta["world_size"] == 2 and meta["config"]["wandb_group"] == "sweep-tr"
    assert read_json(run / "trial.json")["command"].split()[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert load_study(sweep_dir).best_trial.value == read_json(run / "summary.json")["test_accuracy"]


# ---------------------------------------------------------------- SLURM: a 2-task array
@pytest.mark.slow
@on_the_cluster
def test_slurm_launcher_runs_a_two_task_array_stops_and_resumes(cluster, small_mnist, tmp_path):
    """2 trials, 2 in parallel: one array job of two tasks over slurm/train.sbatch on the session's
    local cluster's two nodes. SIGTERM to the sweep once both train: the tasks get SIGTERM (scancel),
    both checkpoint; the same command again submits them again, they resume and complete. (Small
    MNIST at batch 64; in the first session rank 0 sleeps 0.05 s after each step, so both tasks are
    still training when the SIGTERM comes.)"""
    space = tmp_path / "space.toml"
    space.write_text("[lr]\nchoices = [0.01, 0.02]\n")
    enqueue = tmp_path / "first.toml"
    enqueue.write_text("[[trial]]\nlr = 0.01\n\n[[trial]]\nlr = 0.02\n")
    sweep_dir = tmp_path / "sw"
    cmd = [sys.executable, *SWEEP, "--space", str(space), "--enqueue", str(enqueue), "--trials", "2",
           "--parallel", "2", "--launcher", "slurm", "--sweep-dir", str(sweep_dir), "--no-prune", "--poll", "1",
           "--data-dir", str(small_mnist), "--batch-size", "64", "--max-steps", "60", "--eval-every", "10", *QUIET]

    def task_logs() -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((sweep_dir / "slurm").glob("*.out")))

    env = cluster.env(child_env(PYTHON=sys.executable, PYTHONPATH=str(REPO)))
    first_log = tmp_path / "first.log"
    evals = [sweep_dir / f"trial-000{i}" / "evaluations.jsonl" for i in (0, 1)]
    rc = sigterm_when_ready(cmd, {**env, "MNIST_DIST_FAULT": "delay,point=step,rank=0,seconds=0.05"}, first_log,
                            lambda: all(e.is_file() and read_jsonl(e) for e in evals),  # both train
                            lambda: f"{first_log.read_text()}\n{task_logs()}\n{cluster.logs()}", poll=1)
    assert rc == 3, f"{first_log.read_text()}\n{task_logs()}"
    jobs = [read_json(sweep_dir / f"trial-000{i}" / "trial.json")["slurm_job"] for i in (0, 1)]
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_0", f"{array}_1"], jobs  # one array job, two tasks
    for i in (0, 1):
        run = sweep_dir / f"trial-000{i}"
        assert read_json(run / "trial.json")["state"] == "interrupted"
        assert list((run / "checkpoints").glob("*.pt")), task_logs()
        log = (sweep_dir / "slurm" / f"{array}_{i}.out").read_text()
        assert f"[sweep] array task {array}_{i}: trial dir {run}" in log
        assert "stopped by signal SIGTERM" in log, log
    assert states(load_study(sweep_dir, journal=True)) == {0: "RUNNING", 1: "RUNNING"}

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 0, f"{second.stdout}\n{second.stderr}\n{task_logs()}\n{cluster.logs()}"
    assert (sweep_dir / "study.journal").is_file() and not (sweep_dir / "study.db").exists()
    study = load_study(sweep_dir, journal=True)
    assert states(study) == {0: "COMPLETE", 1: "COMPLETE"}, second.stdout
    again = [read_json(sweep_dir / f"trial-000{i}" / "trial.json")["slurm_job"] for i in (0, 1)]
    assert again[0].split("_")[0] == again[1].split("_")[0] != array  # resubmitted together
    for t in study.get_trials():
        run = sweep_dir / f"trial-{t.number:04d}"
        summary = read_json(run / "summary.json")
        assert t.value == summary["test_accuracy"] and summary["global_step"] == 60
        assert read_json(run / "config.json")["config"]["lr"] == t.params["lr"]
        assert read_json(run / "trial.json")["starts"] == 2
        log = (sweep_dir / "slurm" / f"{again[t.number]}.out").read_text()
        assert "resumed from" in log and "training step finished with exit code 0" in log, log


def test_a_trial_with_bad_input_stops_the_sweep_with_its_error_line(tmp_path):
    """Every trial would fail the same way: the first one's error line ends the sweep (exit 2)."""
    space = tmp_path / "space.toml"
    space.write_text("[lr]\nchoices = [0.01, 0.02]\n")
    sweep_dir = tmp_path / "s"
    proc = python(*SWEEP, "--space", str(space), "--trials", "3", "--sweep-dir", str(sweep_dir),
                  "--data-dir", str(tmp_path / "no-data"), "--no-download", *QUIET, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = assert_one_line_error(proc, "trial 0 failed: error:", "no-data")
    assert str(sweep_dir / "trial-0000" / "train.log") in line
    assert states(load_study(sweep_dir)) == {0: "FAIL"}
