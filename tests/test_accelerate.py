"""The accelerate engine (--engine accelerate) and `accelerate launch`: real processes, real gloo."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, child_env, free_port, last_json_line, ok,
                      read_json, run, torchrun)
from test_checkpoint import FLAGS
from test_train import check_run_dir

pytest.importorskip("accelerate")

ACCURACY_TARGET = 0.9  # after 2 epochs (46 steps) of the fast recipe on the small MNIST


def accelerate_launch(nproc: int, *args: str, hf_home: Path, launch_flags: tuple[str, ...] = (),
                      timeout: float = 300):
    """`accelerate launch` with every flag explicit, so no config file is read or written.

    On a CPU-only machine `--multi_gpu` is the flag that starts N processes (torch's elastic launcher);
    `--cpu --num_processes N` would start only one (multi-CPU there means mpirun).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--machine_rank", "0", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           *(launch_flags or ("--mixed_precision", "no")), *args]
    # HF_HOME in a temp dir: a user's ~/.cache/huggingface/accelerate config can neither leak in nor be written
    return run(cmd, timeout=timeout, env=child_env(HF_HOME=str(hf_home)))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True, map_location="cpu")


@pytest.mark.slow
def test_both_engines_two_ranks_same_seed_reach_the_target_with_the_same_weights(small_mnist, tmp_path,
                                                                                 reference_runs):
    """Same seed, same sampler order, same DDP all-reduce: the engines differ only in who wraps the
    model and calls backward, so on the CPU (fp32) they produce bit-identical weights. (The ddp run is
    the session's shared 2-rank run of these flags.)"""
    runs = {}
    flags = ("--seed", "3", "--epochs", "2", "--data-dir", str(small_mnist), *QUIET)
    for engine in ("ddp", "accelerate"):
        if engine == "ddp":
            out = reference_runs.get("--engine", engine, *flags, nproc=2)
        else:
            out = tmp_path / engine
            ok(torchrun(2, str(TRAIN_SCRIPT), "--engine", engine, *flags, "--out-dir", str(out)))
        summary = check_run_dir(out, world_size=2, epochs=2, test_total=1000)
        assert summary["test_accuracy"] >= ACCURACY_TARGET, (engine, summary["test_accuracy"])
        config = read_json(out / "config.json")
        assert config["config"]["engine"] == engine
        assert config["backend"] == "gloo" and config["device"] == "cpu" and config["amp"] == "off"
        assert config["per_rank_batch"] == 128
        runs[engine] = out
    a, b = weights(runs["ddp"]), weights(runs["accelerate"])
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"engines disagree on {different}"
    assert read_json(runs["ddp"] / "summary.json")["test_correct"] == \
        read_json(runs["accelerate"] / "summary.json")["test_correct"]


@pytest.mark.slow
def test_accelerate_engine_evaluation_is_exact_at_world_size_3(small_mnist, tmp_path, cli):
    """1,000 (the small MNIST's test set) does not divide by 3: a padded sampler would count
    duplicates. Our shards over the process group that accelerate created give exactly 1,000 images
    and the same correct count as one process evaluating the saved weights."""
    out = tmp_path / "three"
    ok(torchrun(3, str(TRAIN_SCRIPT), "--engine", "accelerate", "--batch-size", "240", "--max-steps", "20",
                "--data-dir", str(small_mnist), "--out-dir", str(out), *QUIET))
    summary = check_run_dir(out, world_size=3, test_total=1000)
    config = read_json(out / "config.json")
    assert config["world_size"] == 3 and config["backend"] == "gloo" and config["per_rank_batch"] == 80
    single = last_json_line(ok(cli("evaluate", "--run-dir", out, "--data-dir", small_mnist)).stdout)
    assert single["world_size"] == 1 and single["test_total"] == 1000
    assert single["test_correct"] == summary["test_correct"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "accelerate"])
def test_accelerate_launch_starts_two_real_processes(engine, small_mnist, tmp_path):
    out = tmp_path / engine
    proc = ok(accelerate_launch(2, str(TRAIN_SCRIPT), "--engine", engine, "--max-steps", "20",
                                "--data-dir", str(small_mnist), "--out-dir", str(out), *QUIET,
                                hf_home=tmp_path / "hf"))
    summary = check_run_dir(out, world_size=2, test_total=1000)
    config = read_json(out / "config.json")
    assert config["world_size"] == 2 and summary["world_size"] == 2
    assert config["backend"] == "gloo" and config["config"]["engine"] == engine
    assert proc.stdout.count("epoch 1/1") == 1, "only rank 0 logs"
    assert not (tmp_path / "hf" / "accelerate").exists(), "accelerate wrote a config file"


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_flag_reaches_the_engine(small_mnist, tmp_path):
    """--amp auto + `accelerate launch --mixed_precision bf16` → bf16 autocast through Accelerator
    (works on the CPU); an explicit --amp would win over the launcher flag."""
    out = tmp_path / "bf16"
    ok(accelerate_launch(2, str(TRAIN_SCRIPT), "--engine", "accelerate", "--max-steps", "40",
                         "--data-dir", str(small_mnist), "--out-dir", str(out), *QUIET,
                         hf_home=tmp_path / "hf", launch_flags=("--mixed_precision", "bf16")))
    check_run_dir(out, world_size=2, test_total=1000)
    assert read_json(out / "config.json")["amp"] == "bf16"
    assert read_json(out / "summary.json")["test_accuracy"] > 0.8


def test_accelerate_engine_single_process(small_mnist, tmp_path, cli):
    out = tmp_path / "one"
    ok(cli("--engine", "accelerate", "--max-steps", "10", "--data-dir", small_mnist, "--out-dir", out, *QUIET))
    check_run_dir(out, world_size=1, test_total=1000)
    assert read_json(out / "config.json")["backend"] is None


@pytest.mark.parametrize("args, env, needle", [
    (["--engine", "deepspeed"], {}, "--engine must be one of ddp, accelerate"),
    (["--engine", "accelerate", "--amp", "fp16", "--device", "cpu"], {}, "--amp fp16 needs a CUDA device"),
    (["--engine", "accelerate", "--device", "cpu"], {"ACCELERATE_MIXED_PRECISION": "fp8"},
     "ACCELERATE_MIXED_PRECISION='fp8'"),
    (["--engine", "accelerate", "--device", "cpu"], {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
     "gradient accumulation (4 steps"),
])
def test_accelerate_engine_bad_input(args, env, needle, tmp_path, cli):
    proc = cli(*args, "--max-steps", "1", "--data-dir", tmp_path, "--out-dir", tmp_path / "run", "--no-progress",
               env=env)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)


# 15 steps per epoch of the small MNIST, 2 epochs, a checkpoint every 5 steps (test_checkpoint.py's)
RESUME_FLAGS = FLAGS


@pytest.mark.slow
def test_accelerate_engine_resume_after_a_crash_is_bitwise_exact(small_mnist, tmp_path, reference_runs):
    """Our checkpoint format under the accelerate engine: the raw module, the plain optimizer and
    scheduler, accelerator's scaler (or the disabled one), every rank's RNG. A crash at step 22 and
    --resume auto (from step 20, mid-epoch 2) end with the same weights as an uninterrupted run (the
    engines give bit-identical weights on the CPU, so the straight run is test_checkpoint.py's shared
    ddp run); the same checkpoint also resumes under the ddp engine: the format does not depend on
    the engine."""
    import shutil

    from mnist_dist import checkpoint

    def flags(out: Path, engine: str, *extra: str) -> list[str]:
        return [str(TRAIN_SCRIPT), "--engine", engine, *RESUME_FLAGS, "--data-dir", str(small_mnist),
                "--out-dir", str(out), *extra]

    straight = reference_runs.get(*RESUME_FLAGS, "--data-dir", str(small_mnist), nproc=2)
    crashed = tmp_path / "crashed"
    failed = torchrun(2, *flags(crashed, "accelerate"), env=child_env(MNIST_DIST_FAULT="raise,rank=0,step=22"))
    assert failed.returncode != 0
    assert checkpoint.list_checkpoints(crashed)[-1].name == "step-00000020.pt"
    as_ddp = tmp_path / "as-ddp"
    shutil.copytree(crashed, as_ddp)
    for out, engine in ((crashed, "accelerate"), (as_ddp, "ddp")):
        resumed = ok(torchrun(2, *flags(out, engine, "--resume", "auto")))
        assert "step-00000020.pt at epoch 2 step 5" in resumed.stdout
        a, b = weights(straight), weights(out)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{engine} resume differs from the straight run on {different}"
        assert read_json(out / "config.json")["config"]["engine"] == engine
        assert read_json(straight / "config.json")["config"]["engine"] == "ddp"
        assert read_json(out / "summary.json")["test_correct"] == read_json(straight / "summary.json")["test_correct"]
