"""Nothing read from a run directory runs code, and bad input is one ``error:`` line, never a traceback.

- ``predict`` rebuilds the model from model.pt (weights only) + config.json and never opens model.pt2:
  a crafted model.pt2 whose weight is a pickle (``torch.export.load`` runs it: shown first) runs
  nothing; without model.pt, one error line;
- decompression-bomb and oversized images are one ``error: PATH: ...`` line each, the other files
  are still predicted;
- ``doctor`` reads Flight Recorder dumps as plain data: a real dump still reads, a crafted one
  (torch's own reader runs it: shown first) is refused with one line; a directory that is not a run
  directory is one error line (exit 2);
- a sweep whose space yields only values the training flags refuse is one error line (exit 2); one
  where some trials are refused and others run finishes as before (slow).

Each payload would create a marker file in the test's tmp_path; the tests assert it does not exist.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QUIET, assert_one_line_error, ok, python

PREFIX = "fr_trace_rank_"


class RunsCommand:
    """Unpickling this runs a shell command (what a crafted pickle does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def payload(marker: Path) -> RunsCommand:
    return RunsCommand(f"touch {shlex.quote(str(marker))}")


def digit_png(path: Path) -> Path:
    from PIL import Image

    digit = np.zeros((60, 40), np.uint8)
    digit[10:50, 18:24] = 255  # a "1": white on black
    Image.fromarray(digit).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid-looking PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory of our own: config.json, model.pt (a real state_dict) and the real model.pt2
    exported from it (untrained weights: these tests are about which file is read)."""
    from mnist_dist.models import build_model
    from mnist_dist.outputs.export import save_export

    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model("fast").eval()
    (folder / "config.json").write_text(json.dumps({"config": {"model": "fast", "normalize": True}}))
    torch.save(model.state_dict(), folder / "model.pt")
    save_export(model, normalize=True, run_dir=folder)
    return folder


def craft_model_pt2(real: Path, out: Path, marker: Path) -> Path:
    """``real`` with its first weight marked ``use_pickle`` and replaced by a pickle that touches
    ``marker``: torch.export.load unpickles such weights with weights_only=False."""
    evil = io.BytesIO()
    torch.save(payload(marker), evil)
    with zipfile.ZipFile(real) as zin, zipfile.ZipFile(out, "w") as zout:
        config_name = next(n for n in zin.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(zin.read(config_name))
        meta = next(iter(config["config"].values()))
        meta["use_pickle"] = True
        weight_name = f"{config_name.rsplit('/', 1)[0]}/{meta['path_name']}"
        for info in zin.infolist():
            data = {config_name: json.dumps(config).encode(), weight_name: evil.getvalue()}.get(info.filename)
            zout.writestr(info, data if data is not None else zin.read(info))
    return out


# ----------------------------------------------------------------------------- predict
def test_predict_never_loads_model_pt2_even_a_crafted_one(run_dir, tmp_path, cli):
    marker = tmp_path / "ran"
    crafted = craft_model_pt2(run_dir / "model.pt2", tmp_path / "model.pt2", marker)
    # the file is a real attack: torch.export.load runs its pickle (then fails on what it returned)
    with pytest.raises(Exception):  # noqa: B017 - torch fails on what the pickle returned
        torch.export.load(str(crafted))
    assert marker.exists(), "the crafted model.pt2 should run its payload under torch.export.load"
    marker.unlink()

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.pt"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    (run / "model.pt2").write_bytes(crafted.read_bytes())
    image = digit_png(tmp_path / "one.png")
    proc = cli("predict", "--run-dir", run, image)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "predict ran the crafted model.pt2's pickle"
    # the digit is model.pt's own (a stale or crafted model.pt2 plays no part)
    from mnist_dist.outputs.export import PixelsToLogits
    from mnist_dist.outputs.rundir import load_run_model
    from mnist_dist.tools.images import load_digit

    model, _ = load_run_model(run_dir)
    with torch.no_grad():
        expected = int(PixelsToLogits(model, True).eval()(load_digit(image)[None]).argmax())
    assert proc.stdout.splitlines() == [proc.stdout.splitlines()[0]]
    assert proc.stdout.split("\t")[1] == f"digit {expected}", proc.stdout

    (run / "model.pt").unlink()  # model.pt2 alone: one line saying model.pt is needed
    proc = cli("predict", "--run-dir", run, image)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"{run / 'model.pt'} is missing", "model.pt and config.json", "never loaded")
    assert len(proc.stderr.splitlines()) == 1 and not proc.stdout
    assert not marker.exists()


def test_garbage_model_pt2_does_not_matter_to_predict(run_dir, tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.pt"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    (run / "model.pt2").write_bytes(b"not a zip archive at all")
    proc = cli("predict", "--run-dir", run, digit_png(tmp_path / "one.png"))
    assert proc.returncode == 0 and proc.stdout.count("\tdigit ") == 1, proc.stderr


def test_oversized_images_are_one_error_line_each_and_the_rest_is_predicted(run_dir, tmp_path, cli):
    good = digit_png(tmp_path / "good.png")
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)  # PIL: DecompressionBombError
    warned = png_header_only(tmp_path / "warned.png", 10000, 10000)  # PIL: only a DecompressionBombWarning
    large = png_header_only(tmp_path / "large.png", 8500, 8500)  # 72 megapixels: under PIL's limit, over ours
    assert bomb.stat().st_size < 200
    proc = cli("predict", "--run-dir", run_dir, bomb, good, warned, large)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), errors
    for line, path in zip(errors, (bomb, warned, large)):
        assert line.startswith(f"error: {path}: too large") and "refused before decoding" in line, line
    assert "8500x8500 pixels, more than 64 megapixels" in errors[2]
    assert errors[3] == "error: 3 of 4 image(s) could not be read"
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{good}\tdigit "), proc.stdout


# ----------------------------------------------------------------------------- doctor
DUMP_SCRIPT = """
import os, sys
from pathlib import Path
os.environ["TORCH_FR_BUFFER_SIZE"] = "2000"
import torch, torch.distributed as dist
from mnist_dist.diagnostics import flight
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[2], 1), rank=0, world_size=1)
dist.all_reduce(torch.ones(4))
assert flight.dump(Path(sys.argv[1]), 0)
dist.destroy_process_group()
"""


def test_doctor_reads_a_real_dump_and_refuses_a_crafted_one(tmp_path, cli):
    run = tmp_path / "run"
    debug = run / "debug"
    debug.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"world_size": 2, "backend": "gloo", "config": {}}))
    ok(python("-c", DUMP_SCRIPT, str(debug), str(tmp_path / "store"), timeout=120))  # a real gloo dump of rank 0
    marker = tmp_path / "ran"
    crafted = debug / f"{PREFIX}1"
    crafted.write_bytes(pickle.dumps({"version": "2.10", "pg_config": {}, "entries": [payload(marker)]}))
    # torch's reader (what doctor used) runs it
    from torch.distributed.flight_recorder.components.loader import read_dump

    read_dump(PREFIX, str(crafted))
    assert marker.exists(), "torch's reader should run the crafted dump's payload"
    marker.unlink()

    proc = cli("doctor", "--run-dir", run)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert not marker.exists(), "doctor ran the crafted dump's pickle"
    assert "flight recorder (torch's reader): rank 0: last gloo:all_reduce" in proc.stdout, proc.stdout
    refused = [line for line in proc.stdout.splitlines() if "refused" in line]
    assert refused == ["flight recorder: refused fr_trace_rank_1: it holds a Python object (posix.system)"], \
        proc.stdout
    data = json.loads(ok(cli("doctor", "--run-dir", run, "--json")).stdout)
    assert list(data["flight_recorder"]["ranks"]) == ["0"] and len(data["flight_recorder"]["refused"]) == 1
    assert not marker.exists()

    crafted.write_bytes(b"\x80\x04not a pickle")  # garbage: refused too, rank 0 still read
    proc = ok(cli("doctor", "--run-dir", run))
    assert "flight recorder: refused fr_trace_rank_1:" in proc.stdout and "rank 0: last gloo:" in proc.stdout


def test_doctor_on_a_directory_that_is_not_a_run_directory(tmp_path, cli):
    for folder in (Path("/etc"), tmp_path):
        (tmp_path / "notes.txt").write_text("not a run")
        proc = cli("doctor", "--run-dir", folder)
        assert proc.returncode == 2, proc.stdout
        assert_one_line_error(proc, f"{folder} is not an mnist-dist run directory (no config.json")
        assert not proc.stdout
    # another node's out-dir holds only debug/ (no shared file system): still a run directory
    (tmp_path / "debug").mkdir()
    assert "missing: none named" in ok(cli("doctor", "--run-dir", tmp_path)).stdout
    # files not as we write them: ignored (config.json not an object) or one error line
    (tmp_path / "config.json").write_text("[1, 2]")
    assert ok(cli("doctor", "--run-dir", tmp_path)).stdout.startswith(f"run {tmp_path}: world size 0")
    (tmp_path / "debug" / "rank-0.json").write_text('{"events": "x"}')
    proc = cli("doctor", "--run-dir", tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "is not as mnist-dist writes it")
    # a crafted world size or rank number is refused at once, not looped over (it was slow)
    (tmp_path / "debug" / "rank-0.json").unlink()
    (tmp_path / "config.json").write_text('{"world_size": 1000000000000}')
    assert_one_line_error(cli("doctor", "--run-dir", tmp_path), "is not an integer in 0..1048576")
    (tmp_path / "config.json").write_text('{"world_size": 2}')
    (tmp_path / "debug" / "rank-99999999999.txt").write_text("")
    assert_one_line_error(cli("doctor", "--run-dir", tmp_path), "names rank 99999999999, more than doctor reads")


# ----------------------------------------------------------------------------- sweep
def test_a_sweep_whose_space_yields_only_refused_values_is_one_error_line(tmp_path, cli):
    pytest.importorskip("optuna", reason="the sweep extra is not installed")
    space = tmp_path / "space.toml"
    space.write_text("[epochs]\nchoices = [0, -1]\n")  # types fine for the space, refused by the job
    sweep_dir = tmp_path / "s"
    proc = cli("sweep", "--space", space, "--trials", "3", "--sweep-dir", sweep_dir, "--poll", "0.05", *QUIET)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = assert_one_line_error(proc, "no trial could start", "refused all 3 trial(s)",
                                 "--epochs must be a positive integer")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stdout.count(": not started: ") == 3 and "sweep done" not in proc.stdout, proc.stdout
    assert not list(sweep_dir.glob("trial-*")), line


@pytest.mark.slow
def test_a_sweep_with_some_refused_trials_still_runs_the_others(small_mnist, tmp_path):
    pytest.importorskip("optuna", reason="the sweep extra is not installed")
    space = tmp_path / "space.toml"
    space.write_text("[epochs]\nchoices = [0, 1]\n")
    first = tmp_path / "first.toml"
    first.write_text("[[trial]]\nepochs = 0\n\n[[trial]]\nepochs = 1\n")  # refused, then run
    sweep_dir = tmp_path / "s"
    proc = ok(python("-m", "mnist_dist", "sweep", "--space", str(space), "--enqueue", str(first), "--trials", "2",
                     "--sweep-dir", str(sweep_dir), "--data-dir", str(small_mnist), "--max-steps", "3",
                     "--poll", "0.2", *QUIET, timeout=300))
    assert "trial 0 {'epochs': 0}: not started:" in proc.stdout and "trial 1 complete" in proc.stdout, proc.stdout
    assert "error:" not in proc.stderr, proc.stderr
