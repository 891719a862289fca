"""GPU readiness, the parts the CPU can show: the defects a first GPU run would hit, each with a test that
fails without its fix (the CUDA-only parts are in test_gpu.py, marked `gpu`)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, child_env, last_json_line, ok, python,
                      read_json, torchrun)
from test_outputs_extra import check_export

from mnist_dist import checkpoint as checkpoint_files
from mnist_dist.callbacks import Callbacks
from mnist_dist.checkpoint import Checkpoints
from mnist_dist.entry import parse_train_args
from mnist_dist.config import resolve_config
from mnist_dist.dist import DistEnv
from mnist_dist.engines._base import Precision, restore_scaler
from mnist_dist.engines.ddp import DDPEngine
from mnist_dist.outputs.rundir import RunDir
from mnist_dist.train import train_epoch
from mnist_dist.trainer import Trainer

CPU = torch.device("cpu")


def flags(mnist_root, out, *extra: str) -> list[str]:
    return [str(TRAIN_SCRIPT), "--data-dir", str(mnist_root), "--out-dir", str(out), *QUIET, *extra]


# ----------------------------------------------------------------------------- 1: --amp across a resume
def test_an_enabled_grad_scaler_resumes_from_a_disabled_ones_empty_state():
    """A bf16/off checkpoint holds a disabled GradScaler's empty state; an fp16 run's enabled scaler
    used to raise "The source state dict is empty" on it (a CPU GradScaler shows the same)."""
    fp16 = Precision("fp16", CPU, torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0))
    note = restore_scaler(fp16, {"scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
                                 "precision": "bf16"})
    assert note == "amp bf16 -> fp16 (GradScaler starts at its initial scale)"
    assert fp16.scaler.get_scale() == 1024.0
    # an fp16 checkpoint's scale carries over to fp16, and is ignored by a disabled scaler
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=64.0).state_dict()
    again = Precision("fp16", CPU, torch.amp.GradScaler("cpu", enabled=True))
    assert restore_scaler(again, {"scaler": saved, "precision": "fp16"}) == ""
    assert again.scaler.get_scale() == 64.0
    off = Precision("off", CPU, torch.amp.GradScaler("cpu", enabled=False))
    assert restore_scaler(off, {"scaler": saved, "precision": "fp16"}) == "amp fp16 -> off"


@pytest.mark.parametrize("before, after", [("bf16", "off"), ("off", "bf16")])
def test_resume_with_a_different_amp(small_mnist, tmp_path, before, after, cli):
    out = tmp_path / "run"
    common = ["--max-steps", "20", "--checkpoint-every", "10"]
    with pytest.raises(RuntimeError, match="injected fault"):  # in this process: the crash is an exception
        cli(*flags(small_mnist, out, *common, "--amp", before)[1:], env={"MNIST_DIST_FAULT": "raise,rank=0,step=15"})
    assert checkpoint_files.list_checkpoints(out)
    resumed = ok(cli(*flags(small_mnist, out, *common, "--amp", after, "--resume", "auto")[1:]))
    assert f"global step 10); amp {before} -> {after}" in resumed.stdout, resumed.stdout
    summary = read_json(out / "summary.json")
    assert summary["amp"] == after and summary["global_step"] == 20 and summary["test_total"] == 1000


# ----------------------------------------------------------------------------- 2: resume loads to the CPU
def test_resumed_optimizer_step_counts_stay_on_the_cpu(small_mnist, tmp_path, cli, monkeypatch):
    """Adam reads ``state["step"]`` with .item() per parameter per step: it must stay a CPU tensor
    (a checkpoint loaded with map_location=<cuda> put it on the GPU: ~20 host syncs per step)."""
    out = tmp_path / "run"
    ok(cli(*flags(small_mnist, out, "--max-steps", "12", "--checkpoint-every", "12")[1:]))
    monkeypatch.setenv("MNIST_DIST_ALLOW_SUBSET", "1")
    cfg = parse_train_args(["--data-dir", str(small_mnist), "--out-dir", str(out), "--resume", "auto",
                            "--max-steps", "12", *QUIET], world_size=1)
    engine = DDPEngine.setup(cfg)
    trainer = Trainer.build(cfg, engine)
    assert Checkpoints(cfg, engine.env).resume(trainer) is not None
    steps = [s["step"] for s in trainer.optimizer.state.values()]
    assert len(steps) == len(list(trainer.model.parameters()))
    assert all(torch.is_tensor(t) and t.device.type == "cpu" and int(t) == 12 for t in steps)


# ----------------------------------------------------------------------------- 3: SyncBatchNorm is opt-in
def test_sync_batchnorm_is_opt_in():
    assert resolve_config("best", {}).sync_bn is False and resolve_config("fast", {}).sync_bn is False
    assert resolve_config("best", {"sync_bn": True}).sync_bn is True


# ----------------------------------------------------------------------------- 5: rank 0's epilogue
@pytest.mark.slow
def test_rank0_slow_epilogue_outside_the_collective_window(small_mnist, tmp_path):
    """Rank 0 spends 12 s in its final writes with --dist-timeout 8: the others must not be waiting
    in a collective meanwhile (they used to wait in the last barrier, time out, and torchrun
    restarted a finished job). One clean exit, one result line."""
    out = tmp_path / "run"
    env = child_env(MNIST_DIST_FAULT="delay,point=epilogue,rank=0,seconds=12,attempt=*")
    proc = ok(torchrun(2, *flags(small_mnist, out, "--max-steps", "20", "--dist-timeout", "8"),
                       env=env, extra=["--max-restarts=1"], timeout=240))
    assert proc.stdout.count("done: test accuracy") == 1, proc.stdout
    assert proc.stdout.count("run dir ") == 1, "torchrun restarted the worker group"
    for sign in ("Timed out", "exitcode", "Traceback"):
        assert sign not in proc.stderr, proc.stderr
    assert read_json(out / "summary.json")["world_size"] == 2


# ----------------------------------------------------------------------------- 6 + 15: one precision for all counts
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "accelerate"])
def test_bf16_run_summary_evaluate_and_export_agree(small_mnist, tmp_path, engine, cli):
    """Training in bf16: summary.json's test_correct, `mnist-dist evaluate` and model.pt2 (in a
    process that cannot import mnist_dist) count exactly the same images correct — evaluation is fp32
    everywhere, and the accelerate engine exports the module's own forward, not an autocast patch."""
    if engine == "accelerate":
        pytest.importorskip("accelerate")
    out = tmp_path / "run"
    ok(cli(*[f for f in flags(small_mnist, out, "--max-steps", "20", "--amp", "bf16", "--engine", engine)[1:]
             if f != "--no-export"]))
    summary = read_json(out / "summary.json")
    assert summary["amp"] == "bf16"
    evaluated = last_json_line(ok(cli("evaluate", "--run-dir", out, "--data-dir", small_mnist)).stdout)
    assert evaluated["test_correct"] == summary["test_correct"]
    # the loss shows the precision: a bf16 evaluation differs in the 3rd digit, fp32 ones agree
    assert evaluated["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6, abs=0)
    check_export(out, small_mnist)  # the .pt2's count == summary's (in a process without mnist_dist)


# ----------------------------------------------------------------------------- 8, 9: flags
@pytest.mark.parametrize("args, needle", [
    (["--compile", "--compile-mode", "max-autotune"], "CUDA graphs"),
    (["--deterministic", "--cudnn-benchmark"], "--deterministic"),
])
def test_flags_refused_on_this_machine(small_mnist, tmp_path, args, needle, cli):
    proc = cli(*flags(small_mnist, tmp_path / "r", "--max-steps", "1", *args)[1:])
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)


def test_deterministic_run_is_reproducible(small_mnist, tmp_path, cli):
    """Two --deterministic runs: one in a process of its own, one in this process."""
    ok(python(*flags(small_mnist, tmp_path / "a", "--max-steps", "10", "--deterministic")))
    ok(cli(*flags(small_mnist, tmp_path / "b", "--max-steps", "10", "--deterministic")[1:]))
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- 11: fp16 skipped steps
class ScalerWithoutAutocast(Precision):
    """fp16's GradScaler, without fp16 autocast: CPU convolutions in fp16 take ~2 s a step, and the
    schedule's bookkeeping does not depend on the dtype of the forward pass."""

    def autocast(self):
        return contextlib.nullcontext()


def test_skipped_fp16_steps_are_taken_back_from_the_schedule(small_mnist, tmp_path, isolated, monkeypatch):
    """GradScaler skips steps with inf gradients; the LR schedule must count the optimizer steps
    really taken (it used to advance on skipped steps). A CPU GradScaler (enabled) stands in for
    fp16 here; inf losses are injected at steps 2, 3 and 13."""
    monkeypatch.setenv("MNIST_DIST_ALLOW_SUBSET", "1")
    cfg = parse_train_args(["--data-dir", str(small_mnist), "--out-dir", str(tmp_path / "run"),
                            "--epochs", "2", "--max-steps", "25", "--stop-check-every", "5", *QUIET],
                           world_size=1)
    env = DistEnv(0, 0, 1, 1, CPU, None)
    engine = DDPEngine(cfg, env, ScalerWithoutAutocast("fp16", CPU, torch.amp.GradScaler("cpu", enabled=True)))
    trainer = Trainer.build(cfg, engine)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("inf") if calls["n"] in (2, 3, 13) else output

    trainer.model.register_forward_hook(poison)
    for _ in range(2):  # the loop's own epochs (a checkpoint at each end, no run files)
        train_epoch(trainer, RunDir(cfg.out_dir, enabled=False), Checkpoints(cfg, env), Callbacks())
    assert trainer.position.global_step == 25
    assert int(engine.skipped_steps) == 3 and trainer.rewound == 3
    assert trainer.scheduler.last_epoch == 22, "the schedule counts the 22 steps really taken"
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.Adam([torch.zeros(1)], lr=cfg.lr), max_lr=cfg.lr, total_steps=25, pct_start=0.25,
        cycle_momentum=False)
    for _ in range(22):
        reference.optimizer.step()
        reference.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0], rel=1e-12)


# ----------------------------------------------------------------------------- 13: compile workers
def test_inductor_compile_workers_are_shared_between_local_ranks(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    cfg = resolve_config("fast", {"compile": True})
    DDPEngine(cfg, DistEnv(0, 0, 2, 2, CPU, "gloo"), Precision("off", CPU, torch.amp.GradScaler("cpu", enabled=False))
              ).configure_torch()
    import torch._inductor.config as inductor_config

    from mnist_dist.dist import usable_cpu_count

    expected = max(1, usable_cpu_count() // 2)
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == str(expected)
    assert inductor_config.compile_threads == expected


# ----------------------------------------------------------------------------- 7: the CPU suite hides GPUs
def test_cpu_suite_children_see_no_gpu():
    proc = ok(python("-c", "import torch; print('GPUS', torch.cuda.device_count())"))
    assert "GPUS 0" in proc.stdout
    assert child_env()["CUDA_VISIBLE_DEVICES"] == ""
