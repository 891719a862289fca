"""wandb tracking, for real and offline: the run's own transaction log is read back and checked.

Nothing here can reach a wandb server: WANDB_MODE=offline (child_env), no API key, HOME and NETRC
in a temporary directory, and WANDB_BASE_URL pointing at a closed local port.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from conftest import (TRAIN_SCRIPT, assert_one_line_error, child_env, ok, python, read_json,  # noqa: E402
                      read_jsonl, torchrun)
from wandb_offline import offline_runs, read_offline_run  # noqa: E402


def no_server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = child_env(HOME=str(home), NETRC=str(home / "no-netrc"), WANDB_BASE_URL="http://127.0.0.1:9",
                    WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(home / "wandb-cache"),
                    WANDB_DATA_DIR=str(home / "wandb-data"))
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT", "WANDB_ENTITY",
                "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_RUN_ID", "WANDB_RESUME"):
        env.pop(key, None)
    env.update(extra)
    return env


@pytest.mark.slow
def test_wandb_under_torchrun_one_run_from_rank0_with_history_summary_and_artifact(small_mnist, tmp_path):
    out = tmp_path / "run"
    # --wandb-mode online with no API key: must fall back to offline with one notice line
    proc = ok(torchrun(2, str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(out),
                       "--no-progress", "--batch-size", "128", "--max-steps", "30", "--wandb", "--wandb-mode", "online",
                       "--wandb-every", "10", "--wandb-project", "proj", "--wandb-name", "myrun",
                       "--wandb-group", "grp", "--wandb-tags", "a, b", timeout=300,
                       env=no_server_env(tmp_path)))
    notices = [line for line in proc.stderr.splitlines() if "no API key" in line]
    assert len(notices) == 1, proc.stderr  # rank 0 only, one line

    files = offline_runs(out)
    assert len(files) == 1, f"expected one wandb run (rank 0 only), found {files}"
    run = read_offline_run(files[0])
    assert run.exited
    assert (run.project, run.name, run.group, sorted(run.tags)) == ("proj", "myrun", "grp", ["a", "b"])
    config = read_json(out / "config.json")
    assert run.config["world_size"] == 2
    assert run.config["config"] == config["config"]

    steps = [row for row in run.history if "batch_loss" in row]
    assert [row["global_step"] for row in steps] == [10, 20, 30]
    assert all(row["batch_loss"] > 0 and row["lr"] > 0 for row in steps)
    metrics = read_jsonl(out / "metrics.jsonl")
    epochs = [row for row in run.history if "test_accuracy" in row]
    assert len(epochs) == len(metrics) == 1
    for key, value in metrics[0].items():
        if isinstance(value, (int, float)):
            assert epochs[0][key] == pytest.approx(value, rel=1e-12), key
        else:  # e.g. memory_kind, the per-rank lists
            assert epochs[0][key] == value, key
    assert epochs[0]["global_step"] == 30

    summary = read_json(out / "summary.json")
    assert run.summary["test_correct"] == summary["test_correct"]
    assert run.summary["test_total"] == 1000
    assert run.summary["world_size"] == 2
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert len(models) == 1 and {"model.pt", "model.pt2"} <= set(models[0]["files"])

    # the same run also got the pictures and the export, computed across both ranks
    confusion = read_json(out / "confusion_matrix.json")
    assert sum(map(sum, confusion["counts"])) == 1000
    assert sum(confusion["counts"][d][d] for d in range(10)) == summary["test_correct"]
    assert (out / "model.pt2").is_file() and (out / "mistakes.png").is_file()


@pytest.mark.slow
def test_network_down_falls_back_to_offline_and_resume_keeps_the_run_id(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from mnist_dist.config import TrainConfig
        from mnist_dist.dist import DistEnv
        from mnist_dist.outputs.tracking import Tracker

        run_dir = sys.argv[1]
        cfg = TrainConfig(wandb=True, wandb_mode="online", wandb_every=2)
        env = DistEnv(0, 0, 1, 1, torch.device("cpu"), None)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        first = Tracker.start(cfg, env, {"config": cfg.to_json()}, run_dir)
        assert first.active, "tracking must survive a dead server"
        run_id = first.run_id
        for step in range(1, 5):
            first.on_step(step, torch.tensor(1.0 / step), opt)
        first.on_epoch({"epoch": 1, "train_loss": 0.25}, 4)
        first.finish({"test_correct": 7})
        cfg.wandb_mode = "offline"
        second = Tracker.start(cfg, env, {"config": cfg.to_json()}, run_dir, resume_id=run_id)
        second.on_epoch({"epoch": 2, "train_loss": 0.125}, 8)
        print("IDS", run_id, second.run_id)
        second.finish({"test_correct": 8})
    """)
    # a key is "configured" but the server is a closed port: wandb.init fails, training must not
    env = no_server_env(tmp_path, WANDB_API_KEY="x" * 40, WANDB_INIT_TIMEOUT="3")
    env.pop("WANDB_MODE")
    proc = ok(python("-c", script, str(tmp_path), env=env, timeout=240))
    assert "online start failed" in proc.stderr and "logging offline instead" in proc.stderr
    ids = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("IDS")]
    assert ids and ids[0][0] == ids[0][1], proc.stdout
    runs = [read_offline_run(f) for f in offline_runs(tmp_path)]
    assert {r.run_id for r in runs} == {ids[0][0]}
    first = next(r for r in runs if any("batch_loss" in h for h in r.history))
    assert [(h["global_step"], h["batch_loss"], h["lr"]) for h in first.history if "batch_loss" in h] == \
        [(2, 0.5, 0.5), (4, 0.25, 0.5)]
    assert first.summary["test_correct"] == 7
    second = next(r for r in runs if r is not first)
    assert [h["train_loss"] for h in second.history if "train_loss" in h] == [0.125]


def test_wandb_flag_without_the_package_is_one_clear_error(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as without the package
    proc = cli("--wandb", "--data-dir", tmp_path, "--out-dir", tmp_path / "r")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--wandb needs the Python package 'wandb'", "pip install")
    assert not (tmp_path / "r").exists()


def test_bad_wandb_mode_is_one_clear_error(tmp_path, cli):
    proc = cli("--wandb", "--wandb-mode", "sometimes", "--data-dir", tmp_path, "--out-dir", tmp_path / "r")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--wandb-mode must be one of online, offline, disabled")


def test_wandb_off_by_default_leaves_no_wandb_dir(trained_run):
    assert not (trained_run / "wandb").exists()
