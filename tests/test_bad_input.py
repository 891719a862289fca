"""Bad input: one clear ``error:`` line, a non-zero exit and no traceback — never a hang."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, make_fake_mnist, ok, python, torchrun,
                      write_idx_labels)


def train(*args: str, timeout: float = 120):
    return python(str(TRAIN_SCRIPT), *QUIET, *args, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--batch-size", "-8"], "--batch-size must be a positive integer"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--epochs", "-1"], "--epochs must be a positive integer"),
    (["--amp", "fp16", "--device", "cpu", "--max-steps", "1"], "--amp fp16 needs a CUDA device"),
    (["--betas", "2", "0.5"], "--betas must be two numbers in [0, 1), got 2.0 0.5"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    (["--aug-degrees", "nan"], "--aug-degrees must be >= 0, got nan"),
    (["--threads", "100000"], "--threads 100000 is more than 1024"),
])
def test_bad_flags(args, needle, tmp_path):
    proc = train(*args, "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)


def test_batch_not_divisible_by_world_size_fails_before_any_collective(tmp_path, mnist_root):
    proc = torchrun(3, str(TRAIN_SCRIPT), "--batch-size", "256", "--data-dir", str(mnist_root),
                    "--out-dir", str(tmp_path / "run"), timeout=120)
    assert proc.returncode != 0
    assert "error: --batch-size 256 is the global batch and must be divisible by the world size 3" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_help_explains_the_global_batch():
    out = ok(train("--help")).stdout
    assert "GLOBAL batch size" in out and "--data-dir" in out and "--amp" in out


def test_missing_data_offline(tmp_path):
    proc = train("--data-dir", str(tmp_path / "empty"), "--no-download", "--out-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    line = assert_one_line_error(proc, "MNIST files missing", str(tmp_path / "empty"), "mnist_dist download")
    assert "train-images-idx3-ubyte" in line


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    """A real download attempt against a closed local port (no network needed or used)."""
    from torchvision.datasets import MNIST

    from mnist_dist import data
    from mnist_dist.errors import UserError

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(UserError, match="downloading it failed.*python -m mnist_dist download"):
        data.download(tmp_path)


def test_download_command_without_network_or_files(tmp_path):
    proc = python("-m", "mnist_dist", "download", "--data-dir", str(tmp_path), "--help")
    assert proc.returncode == 0 and "--data-dir" in proc.stdout


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "truncated"),
    ("magic", "magic number 2049 (expected 2051)"),
])
def test_corrupt_idx_file(tmp_path, damage, needle):
    root = make_fake_mnist(tmp_path / "data")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[: 16 + 784 * 100])
    else:
        write_idx_labels(images, torch.zeros(60000, dtype=torch.uint8))
    proc = train("--data-dir", str(root), "--out-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert_one_line_error(proc, needle, str(images))


def test_unwritable_out_dir(tmp_path, mnist_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = train("--data-dir", str(mnist_root), "--out-dir", str(blocker / "run"))
    assert proc.returncode == 2
    assert_one_line_error(proc, "cannot write to --out-dir", str(blocker / "run"))


@pytest.mark.parametrize("damage, needle", [
    ("missing", "is missing"),
    ("corrupt", "corrupt or unreadable"),
    ("other-model", "does not match model 'fast'"),
    ("no-config", "config.json is missing"),
    ("no-dir", "does not exist"),
])
@pytest.mark.slow
def test_evaluate_rejects_bad_run_dirs(trained_run, mnist_root, tmp_path, damage, needle):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "model.pt"
    if damage == "missing":
        weights.unlink()
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "other-model":
        from mnist_dist.models import build_model
        torch.save(build_model("seed").state_dict(), weights)
    elif damage == "no-config":
        (run / "config.json").unlink()
    else:
        run = tmp_path / "nowhere"
    proc = python("-m", "mnist_dist", "evaluate", "--run-dir", str(run), "--data-dir", str(mnist_root))
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
