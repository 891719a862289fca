"""The best recipe's pieces and the speed path (augmentation, SyncBN, warm-up, compile,
channels_last, time-to-target). Real processes and the real MNIST; no accuracy-over-15-epochs test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, child_env, last_json_line, ok, python, read_json,
                      read_jsonl, torchrun)
from mnist_dist.data import mnist as data
from mnist_dist.config import resolve_config
from mnist_dist.dist import DistEnv
from mnist_dist.models import build_model
from mnist_dist.data.augment import BatchTransform, augment_batch, augment_seed
from mnist_dist.engines._base import Precision
from mnist_dist.engines.ddp import DDPEngine

CPU = torch.device("cpu")


def env(rank: int = 0, world: int = 1, backend: str | None = None) -> DistEnv:
    return DistEnv(rank, rank, world, world, CPU, backend)


def real_batch(mnist_root, n: int = 64) -> torch.Tensor:
    images, _ = data.load_split(str(mnist_root), train=False)
    return data.to_float(images[:n], normalize=True)


def transform(seed: int = 0, rank: int = 0, world: int = 1, batch: int = 64, steps: int = 4, **flags):
    cfg = resolve_config("best", dict(seed=seed, **flags))
    return BatchTransform(cfg, env(rank, world), batch, steps)


# ----------------------------------------------------------------------------- augmentation
def test_augmentation_keeps_shape_dtype_and_order_and_changes_pixels(mnist_root):
    x = real_batch(mnist_root)
    out = transform()(x, epoch=0, step=1)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert not torch.equal(out, x)
    # each image is transformed on its own by its own draw: the batch is not reordered or mixed,
    # so the labels (which the transform never sees) still belong to their images
    t = transform()
    params = t.epoch_params(0)[64:128]
    for i in (0, 17, 63):
        alone = augment_batch(x[i:i + 1], params[i:i + 1], t.cfg.aug_degrees, t.cfg.aug_shift, t.cfg.aug_scale,
                              -data.MNIST_MEAN / data.MNIST_STD)
        assert torch.allclose(alone[0], out[i], atol=1e-6)
    # background stays background: normalised zero pixels
    background = -data.MNIST_MEAN / data.MNIST_STD
    assert torch.isclose(out[:, :, 0, 0], torch.full_like(out[:, :, 0, 0], background), atol=1e-5).all()


def test_augmentation_is_deterministic_per_seed_rank_epoch_and_resumable(mnist_root):
    x = real_batch(mnist_root)
    a = transform(seed=3)
    assert torch.equal(a(x, 0, 2), transform(seed=3)(x, 0, 2)), "same seed, rank, epoch, step"
    assert not torch.equal(a(x, 0, 2), transform(seed=4)(x, 0, 2))
    assert not torch.equal(a(x, 0, 2), transform(seed=3, rank=1, world=2)(x, 0, 2))
    assert not torch.equal(a(x, 0, 2), a(x, 1, 2)), "a new epoch draws new transforms"
    assert not torch.equal(a(x, 0, 2), a(x, 0, 3)), "each step has its own transforms"
    # resume: step 3 computed directly equals step 3 reached after steps 0..2 (per-epoch draws)
    fresh = transform(seed=3)
    for step in range(3):
        a(x, 5, step)
    assert torch.equal(a(x, 5, 3), fresh(x, 5, 3))
    # seeds never collide by addition: (seed 0, rank 1) vs (seed 1, rank 0), (epoch 1) vs (rank 1)
    assert len({augment_seed(0, 1, 0), augment_seed(1, 0, 0), augment_seed(0, 0, 1)}) == 3


def test_augmentation_geometry(mnist_root):
    x = real_batch(mnist_root, 8)
    background = -data.MNIST_MEAN / data.MNIST_STD
    zero = torch.zeros(len(x), 4)
    assert torch.allclose(augment_batch(x, zero, 10, 2, 0.1, background), x, atol=1e-5), "identity"
    # a full +1 draw of the x-shift with --aug-shift 2 moves the content 2 pixels to the left
    shift = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).repeat(len(x), 1)
    out = augment_batch(x, shift, 0, 2, 0, background)
    assert torch.allclose(out[..., :-2], x[..., 2:], atol=1e-5)
    assert torch.allclose(out[..., -2:], torch.full_like(out[..., -2:], background), atol=1e-5)


def test_channels_last_only_transform(mnist_root):
    x = real_batch(mnist_root).repeat(1, 3, 1, 1)  # C > 1 so the layout is observable
    out = transform(augment=False, channels_last=True)(x, 0, 0)
    assert torch.equal(out, x) and out.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- model preparation
def prepare_model(model: nn.Module, cfg, dist_env: DistEnv) -> nn.Module:
    """``Engine.prepare`` of the ddp engine on ``dist_env`` (no process group is joined)."""
    precision = Precision("off", dist_env.device, torch.amp.GradScaler(dist_env.device.type, enabled=False))
    return DDPEngine(cfg, dist_env, precision).prepare(model)


def test_prepare_model_converts_batchnorm_only_under_a_cuda_process_group():
    cfg = resolve_config("best", {"sync_bn": True})  # opt-in (not sync-free)
    cuda_ranks = DistEnv(0, 0, 2, 2, torch.device("cuda", 0), "nccl")  # conversion itself needs no GPU
    synced = prepare_model(build_model("best"), cfg, cuda_ranks)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 3
    for not_converted in (prepare_model(build_model("best"), cfg, env()),  # no process group
                          prepare_model(build_model("best"), cfg, env(0, 2, "gloo")),  # DDP refuses CPU SyncBN
                          prepare_model(build_model("best"), resolve_config("best", {}), cuda_ranks)):  # default
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in not_converted.modules())
        assert sum(isinstance(m, nn.BatchNorm2d) for m in not_converted.modules()) == 3
    plain = prepare_model(build_model("best"), cfg, env())
    # same parameter/buffer names: weights load into the plain model (evaluate, other world sizes)
    assert synced.state_dict().keys() == plain.state_dict().keys()


# ----------------------------------------------------------------------------- real runs
def train(data_root, out, *args, nproc: int = 0, timeout: float = 300, cli=None):
    """A real run: under torchrun (``nproc``), in this process (``cli``), or a plain process."""
    flags = [str(TRAIN_SCRIPT), "--data-dir", str(data_root), "--out-dir", str(out), *QUIET, *args]
    if nproc:
        return ok(torchrun(nproc, *flags, timeout=timeout))
    if cli is not None:
        return ok(cli(*flags[1:]))
    return ok(python(*flags, timeout=timeout))


@pytest.mark.slow
def test_batchnorm_two_ranks_gloo_with_exact_eval(small_mnist, tmp_path, cli):
    """CPU/gloo: per-rank BatchNorm, running statistics averaged before evaluation. The 2-rank
    evaluation during training (each rank its own model copy and shard) must equal rank 0's saved
    weights evaluated alone: it would not if rank 1's statistics differed from rank 0's."""
    out = tmp_path / "run"
    train(small_mnist, out, "--recipe", "best", "--epochs", "1", "--max-steps", "20", nproc=2)
    summary = read_json(out / "summary.json")
    assert summary["sync_batchnorm"] is False and summary["world_size"] == 2
    assert summary["test_total"] == 1000 and summary["test_accuracy"] > 0.5
    # the saved weights evaluate to the same exact counts in a plain process (this one) and on 3 ranks
    for launch in (lambda *a: cli(*a[2:]), lambda *a: torchrun(3, *a)):
        proc = ok(launch("-m", "mnist_dist", "evaluate", "--run-dir", str(out), "--data-dir", str(small_mnist)))
        result = last_json_line(proc.stdout)
        assert (result["test_correct"], result["test_total"]) == (summary["test_correct"], 1000)


def test_warmup_restores_state_exactly(small_mnist, tmp_path, cli):
    common = ["--recipe", "best", "--max-steps", "6", "--threads", "1"]
    train(small_mnist, tmp_path / "plain", *common, cli=cli)
    train(small_mnist, tmp_path / "warm", *common, "--warmup-steps", "4", cli=cli)
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "warm" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        "warm-up changed the run: some state was not restored"
    assert read_json(tmp_path / "warm" / "summary.json")["warmup_seconds"] > 0


def test_time_to_target_with_mid_epoch_evaluation(small_mnist, tmp_path, cli):
    out = tmp_path / "run"
    train(small_mnist, out, "--batch-size", "128", "--max-steps", "40", "--eval-every", "10",
          "--target-accuracy", "0.8", "--channels-last", cli=cli)
    summary = read_json(out / "summary.json")
    metrics = read_jsonl(out / "metrics.jsonl")
    assert summary["channels_last"] is True
    assert summary["steps_to_target"] in (10, 20, 30, 40)
    assert summary["accuracy_at_target"] >= 0.8 and summary["mid_epoch_evaluations"] >= 1
    assert 0 < summary["seconds_to_target"] <= summary["train_seconds"]
    assert summary["train_seconds"] == pytest.approx(metrics[-1]["epoch_seconds"])
    # an unreachable target stays unreached (no number is made up)
    train(small_mnist, tmp_path / "never", "--max-steps", "5", "--target-accuracy", "1.0", cli=cli)
    assert read_json(tmp_path / "never" / "summary.json")["seconds_to_target"] is None


@pytest.mark.slow
def test_time_to_target_survives_a_crash_and_resume(small_mnist, tmp_path, cli):
    """The clock's record travels in checkpoints: reached at step 10 or 20, checkpointed at 25,
    crashed at 32 (a real process), resumed (in this process) -> the same step and accuracy as the
    uninterrupted run (a clock that restarted at the resume would first look again at step 30)."""
    flags = ["--batch-size", "128", "--max-steps", "40", "--eval-every", "10", "--target-accuracy", "0.8",
             "--checkpoint-every", "25"]
    train(small_mnist, tmp_path / "straight", *flags, cli=cli)
    crashed = tmp_path / "crashed"
    args = [str(TRAIN_SCRIPT), "--data-dir", str(small_mnist), "--out-dir", str(crashed), *QUIET, *flags]
    assert python(*args, env=child_env(MNIST_DIST_FAULT="raise,rank=0,step=32")).returncode != 0
    ok(cli(*args[1:], "--resume", "auto"))
    straight, resumed = (read_json(tmp_path / name / "summary.json") for name in ("straight", "crashed"))
    assert straight["steps_to_target"] in (10, 20)
    for key in ("steps_to_target", "accuracy_at_target", "mid_epoch_evaluations", "test_correct"):
        assert resumed[key] == straight[key], key
    assert 0 < resumed["seconds_to_target"] <= resumed["train_seconds"]


@pytest.mark.slow
def test_compiled_short_run_on_cpu(small_mnist, tmp_path):
    out = tmp_path / "run"
    train(small_mnist, out, "--compile", "--max-steps", "8", "--warmup-steps", "2", timeout=600)
    summary = read_json(out / "summary.json")
    assert summary["compile"] is True and summary["compile_mode"] == "default"
    assert summary["test_total"] == 1000 and summary["test_accuracy"] > 0.5
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)


@pytest.mark.parametrize("args, needle", [
    (["--compile", "--compile-mode", "reduce-overhead"], "CUDA graphs"),
    (["--compile-mode", "turbo"], "--compile-mode"),
    (["--aug-scale", "1.5"], "--aug-scale"),
    (["--target-accuracy", "0"], "--target-accuracy"),
    (["--eval-every", "-1"], "--eval-every"),
])
def test_bad_speed_flags(small_mnist, tmp_path, args, needle, cli):
    proc = cli("--data-dir", small_mnist, "--out-dir", tmp_path / "r", "--max-steps", "1", *QUIET, *args)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
