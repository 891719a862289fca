"""Bad input: one clear ``error:`` line, a non-zero exit and no traceback — never a hang.

Most checks run ``mnist-dist`` in this process (the ``cli`` fixture); one real process per entry
point shows that the line and the exit code also reach a shell (``train_ddp.py``, ``python -m
mnist_dist evaluate``, the batch that torchrun splits)."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import (QUIET, TRAIN_SCRIPT, assert_one_line_error, make_fake_mnist, python, torchrun,
                      write_idx_labels)


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
    (["--dist-timeout", "1e300"], "--dist-timeout must be at most 604800 s"),  # was timedelta's OverflowError
])
def test_bad_flags(cli, args, needle, tmp_path):
    result = cli(*QUIET, *args, "--data-dir", tmp_path, "--out-dir", tmp_path / "run")
    assert result.returncode == 2
    assert_one_line_error(result, needle)
    assert not (tmp_path / "run").exists()


def test_bad_flag_from_a_shell_is_one_line_and_exit_2(tmp_path):
    """The same path through a real interpreter: train_ddp.py's exit code and stderr."""
    proc = python(str(TRAIN_SCRIPT), *QUIET, "--epochs", "0", "--data-dir", str(tmp_path), "--out-dir",
                  str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--epochs must be a positive integer")


def test_batch_not_divisible_by_world_size_fails_before_any_collective(tmp_path, small_mnist):
    proc = torchrun(3, str(TRAIN_SCRIPT), "--batch-size", "256", "--data-dir", str(small_mnist),
                    "--out-dir", str(tmp_path / "run"), timeout=120)
    assert proc.returncode != 0
    assert "error: --batch-size 256 is the global batch and must be divisible by the world size 3" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_help_explains_the_global_batch(cli):
    result = cli("--help")
    assert result.returncode == 0
    assert "GLOBAL batch size" in result.stdout and "--data-dir" in result.stdout and "--amp" in result.stdout


def test_missing_data_offline(cli, tmp_path):
    result = cli(*QUIET, "--data-dir", tmp_path / "empty", "--no-download", "--out-dir", tmp_path / "run")
    assert result.returncode == 2
    line = assert_one_line_error(result, "MNIST files missing", str(tmp_path / "empty"), "mnist_dist download")
    assert "train-images-idx3-ubyte" in line


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    """A real download attempt against a closed local port (no network needed or used)."""
    from torchvision.datasets import MNIST

    from mnist_dist.data import mnist as data
    from mnist_dist.errors import UserError

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(UserError, match="downloading it failed.*python -m mnist_dist download"):
        data.download(tmp_path)


def test_download_command_without_network_or_files(cli, tmp_path):
    result = cli("download", "--data-dir", tmp_path, "--help")
    assert result.returncode == 0 and "--data-dir" in result.stdout


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "truncated"),
    ("magic", "magic number 2049 (expected 2051)"),
])
def test_corrupt_idx_file(cli, tmp_path, damage, needle):
    root = make_fake_mnist(tmp_path / "data", n_train=1000, n_test=100)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[: 16 + 784 * 100])
    else:
        write_idx_labels(images, torch.zeros(1000, dtype=torch.uint8))
    result = cli(*QUIET, "--data-dir", root, "--out-dir", tmp_path / "run")
    assert result.returncode == 2
    assert_one_line_error(result, needle, str(images))


def test_unwritable_out_dir(cli, tmp_path, small_mnist):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli(*QUIET, "--data-dir", small_mnist, "--out-dir", blocker / "run")
    assert result.returncode == 2
    assert_one_line_error(result, "cannot write to --out-dir", str(blocker / "run"))


@pytest.mark.parametrize("damage, needle", [
    ("missing", "is missing"),
    ("corrupt", "corrupt or unreadable"),
    ("other-model", "does not match model 'fast'"),
    ("no-config", "config.json is missing"),
    ("no-dir", "does not exist"),
])
def test_evaluate_rejects_bad_run_dirs(cli, trained_run, mnist_root, tmp_path, damage, needle):
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
    result = cli("evaluate", "--run-dir", run, "--data-dir", mnist_root)
    assert result.returncode == 2
    assert_one_line_error(result, needle)


def test_evaluate_error_from_a_shell_is_one_line_and_exit_2(tmp_path, mnist_root):
    proc = python("-m", "mnist_dist", "evaluate", "--run-dir", str(tmp_path / "nowhere"), "--data-dir",
                  str(mnist_root), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "does not exist")

