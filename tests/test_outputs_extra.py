"""Pictures, confusion matrix, model.pt2 export and ``predict`` on image files — on real runs."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (assert_one_line_error, ok, python, read_json)

PICTURES = ("curves.png", "confusion_matrix.png", "mistakes.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def check_confusion(run: Path, total: int = 10000) -> dict:
    confusion = read_json(run / "confusion_matrix.json")
    summary = read_json(run / "summary.json")
    counts = confusion["counts"]
    assert len(counts) == 10 and all(len(row) == 10 for row in counts)
    assert sum(map(sum, counts)) == confusion["total"] == total
    assert [sum(row) for row in counts] == summary["per_class_total"]
    assert [counts[d][d] for d in range(10)] == summary["per_class_correct"]
    assert confusion["correct"] == summary["test_correct"]
    assert len(confusion["mistakes"]) == total - summary["test_correct"]
    assert all(m["label"] != m["predicted"] for m in confusion["mistakes"])
    return confusion


def test_pictures_and_confusion_agree_with_summary(trained_run):
    pytest.importorskip("matplotlib")
    for name in PICTURES:
        assert_png(trained_run / name)
    check_confusion(trained_run)


def test_plot_command_redraws_the_pictures(trained_run, tmp_path, mnist_root, cli):
    pytest.importorskip("matplotlib")
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    for name in PICTURES:
        (run / name).unlink()
    proc = ok(cli("plot", "--run-dir", run, "--data-dir", mnist_root))
    for name in PICTURES:
        assert_png(run / name)
        assert str(run / name) in proc.stdout


# Runs in a child that cannot import mnist_dist: model.pt2 must stand on torch alone.
EXPORT_CHECK = textwrap.dedent("""
    import json, sys
    sys.modules["mnist_dist"] = None  # any import of our package now fails
    import numpy as np, torch
    run, raw = sys.argv[1], sys.argv[2]
    images = np.fromfile(raw + "/t10k-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    labels = np.fromfile(raw + "/t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    x = torch.from_numpy(images.astype(np.float32) / 255)
    program = torch.export.load(run + "/model.pt2").module()
    n = len(labels)
    correct, start = 0, 0
    with torch.no_grad():
        for size in (1, 7, 492, n - 500):  # odd batch sizes: the batch dimension is dynamic
            logits = program(x[start:start + size])
            assert logits.shape == (size, 10), logits.shape
            correct += int((logits.argmax(1).numpy() == labels[start:start + size]).sum())
            start += size
    assert start == n
    print(json.dumps({"correct": correct}))
""")


def check_export(run: Path, data_root: Path) -> None:
    proc = ok(python("-c", EXPORT_CHECK, str(run), str(data_root / "MNIST" / "raw"), timeout=180))
    correct = read_json_line(proc.stdout)["correct"]
    assert correct == read_json(run / "summary.json")["test_correct"]


def read_json_line(text: str) -> dict:
    import json

    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_exported_model_reproduces_test_correct_without_our_code(trained_run, mnist_root):
    assert read_json(trained_run / "config.json")["config"]["normalize"] is True
    check_export(trained_run, mnist_root)


def test_seed_recipe_export_without_normalisation_and_core_without_matplotlib(small_mnist, tmp_path, cli,
                                                                             monkeypatch):
    """The seed recipe feeds raw [0, 1] pixels; and with matplotlib missing, training still succeeds."""
    out = tmp_path / "seed"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as without it
    proc = ok(cli("--recipe", "seed", "--max-steps", "20", "--data-dir", small_mnist, "--out-dir", out,
                  "--no-progress"))
    assert "matplotlib is not installed" in proc.stderr
    assert not any((out / name).exists() for name in PICTURES)
    assert read_json(out / "config.json")["config"]["normalize"] is False
    check_confusion(out, total=1000)  # the counts need no matplotlib
    check_export(out, small_mnist)


def test_no_plots_no_export_flags(small_mnist, tmp_path, cli):
    out = tmp_path / "bare"
    ok(cli("--max-steps", "3", "--no-plots", "--no-export", "--data-dir", small_mnist, "--out-dir", out,
           "--no-progress"))
    assert (out / "summary.json").is_file()
    assert not any((out / name).exists() for name in (*PICTURES, "confusion_matrix.json", "model.pt2"))
    # model.pt2 can be written afterwards from model.pt
    proc = ok(cli("export", "--run-dir", out))
    assert "model.pt2" in proc.stdout
    check_export(out, small_mnist)


# ----------------------------------------------------------------------------- predict
def write_variants(images_u8: torch.Tensor, folder: Path) -> dict[str, list[Path]]:
    """Image files made from real test digits: upscaled grey PNG, ink-on-paper PNG, coloured JPEG."""
    from PIL import Image

    variants: dict[str, list[Path]] = {"upscaled": [], "inverted": [], "colour_jpeg": [], "rgba": []}
    for i, digit in enumerate(images_u8):
        big = Image.fromarray(digit.numpy()).resize((112, 112), Image.BILINEAR)
        grey = np.asarray(big).astype(np.float32) / 255
        paths = {k: folder / f"{k}-{i}.{'jpg' if k == 'colour_jpeg' else 'png'}" for k in variants}
        big.save(paths["upscaled"])
        Image.fromarray(255 - np.asarray(big)).save(paths["inverted"])
        # dark red ink on yellowish paper, not square, lossy
        rgb = np.stack([230 - 150 * grey, 220 - 200 * grey, 140 - 100 * grey], -1).astype(np.uint8)
        Image.fromarray(rgb).resize((150, 120)).save(paths["colour_jpeg"], quality=85)
        # black strokes on a transparent background
        rgba = np.zeros((112, 112, 4), np.uint8)
        rgba[..., 3] = np.asarray(big)
        Image.fromarray(rgba, "RGBA").save(paths["rgba"])
        for k in variants:
            variants[k].append(paths[k])
    return variants


def test_predict_on_image_files_agrees_with_the_model_and_reports_bad_files(trained_run, mnist_root, tmp_path,
                                                                             cli):
    from mnist_dist.data.mnist import load_split

    n = 40
    images, _ = load_split(str(mnist_root), train=False)
    images = images[:n]
    program = torch.export.load(str(trained_run / "model.pt2")).module()
    with torch.no_grad():
        reference = program(images[:, None].float() / 255).argmax(1).tolist()
    variants = write_variants(images, tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    missing = tmp_path / "missing.jpg"
    files = [p for paths in variants.values() for p in paths]
    proc = cli("predict", "--run-dir", trained_run, broken, *files, missing)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert any(str(broken) in e and "not a readable image" in e for e in errors), proc.stderr
    assert any(str(missing) in e and "no such file" in e for e in errors), proc.stderr
    assert "2 of" in errors[-1]
    predicted = {}
    for line in proc.stdout.splitlines():
        path, digit, prob = line.split("\t")
        predicted[path] = int(digit.split()[1])
        assert 0.1 <= float(prob.split()[1]) <= 1.0
    assert len(predicted) == len(files)  # every readable file was processed despite the bad ones
    for kind, paths in variants.items():
        agree = sum(predicted[str(p)] == ref for p, ref in zip(paths, reference))
        assert agree >= 0.85 * n, f"{kind}: only {agree}/{n} agree with the model on the original digits"


def test_image_conversion_polarity_and_blank(tmp_path):
    from PIL import Image

    from mnist_dist.tools.images import ImageError, load_digit

    digit = np.zeros((60, 40), np.uint8)
    digit[10:50, 18:24] = 255  # a "1": white on black
    Image.fromarray(digit).save(tmp_path / "light.png")
    Image.fromarray(255 - digit).save(tmp_path / "dark.png")
    light = load_digit(tmp_path / "light.png")
    assert light.shape == (1, 28, 28) and 0 <= light.min() and light.max() <= 1
    # the stroke is scaled to 20 pixels high and centred by mass
    rows = (light[0] > 0.5).any(dim=1).nonzero().flatten()
    assert 19 <= rows[-1] - rows[0] + 1 <= 21
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = light[0].sum()
    assert abs((light[0] * ys).sum() / mass - 13.5) <= 1 and abs((light[0] * xs).sum() / mass - 13.5) <= 1
    # dark-on-light is detected and inverted; forcing the polarity overrides the detection
    assert torch.allclose(load_digit(tmp_path / "dark.png"), light, atol=1e-6)
    assert torch.allclose(load_digit(tmp_path / "dark.png", "dark-on-light"), light, atol=1e-6)
    assert torch.equal(load_digit(tmp_path / "light.png", "light-on-dark"), light)
    with pytest.raises(ImageError, match="no digit found"):  # forced wrong: the paper is all "ink"
        load_digit(tmp_path / "dark.png", "light-on-dark")
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="no digit found"):
        load_digit(tmp_path / "blank.png")


@pytest.mark.parametrize("command, needle", [
    (["plot", "--run-dir", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["predict", "--run-dir", "/nonexistent/run", "x.png"], "run directory /nonexistent/run does not exist"),
    (["export", "--run-dir", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["evaluate", "--run-dir", "/nonexistent/run", "--dist-timeout", "-5"], "--dist-timeout must be positive"),
])
def test_run_dir_commands_bad_input(command, needle, cli):
    proc = cli(*command)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)


PREDICT_UNDER_TORCHRUN = textwrap.dedent("""
    import json, sys
    import torch
    from mnist_dist import dist
    from mnist_dist.data import mnist as data
    from mnist_dist.data.batches import eval_shard
    from mnist_dist.outputs.rundir import load_run_model
    from mnist_dist.outputs.report import confusion

    @torch.no_grad()
    def test_predictions(model, images, env, batch_size):
        # an independent second computation: a forward pass over this rank's contiguous shard into
        # a zero vector, one all_reduce(SUM) of the disjoint shards
        shard = eval_shard(len(images), env.rank, env.world_size)
        predicted = torch.zeros(len(images), dtype=torch.int64)
        model.eval()
        for start in range(shard.start, shard.stop, batch_size):
            stop = min(start + batch_size, shard.stop)
            predicted[start:stop] = model(images[start:stop]).argmax(dim=1)
        return dist.all_reduce_sum(predicted, env)

    run, root = sys.argv[1], sys.argv[2]
    env = dist.setup("gloo", "cpu", 120.0)
    try:
        model, config = load_run_model(run)
        images, labels = data.load_split(root, train=False)
        predicted = test_predictions(model, data.to_float(images, config["normalize"]), env, 1000)
        if env.is_main:
            print(json.dumps(confusion(labels, predicted)))
        # all ranks done before destroying the group: without this barrier, gloo's exit aborted a rank
        # (SIGABRT, "terminate called without an active exception") in ~1 of 5 runs here
        env.barrier()
    finally:
        dist.teardown()
""")


@pytest.mark.slow
def test_confusion_predictions_are_exact_at_world_size_3(trained_run, mnist_root, tmp_path):
    """10,000 does not divide by 3: contiguous shards + all_reduce still give every prediction once."""
    from conftest import torchrun

    script = tmp_path / "predict_ws3.py"
    script.write_text(PREDICT_UNDER_TORCHRUN)
    proc = ok(torchrun(3, str(script), str(trained_run), str(mnist_root), timeout=240))
    assert read_json_line(proc.stdout) == read_json(trained_run / "confusion_matrix.json")


def test_export_of_a_channels_last_model_is_silent_and_exact(tmp_path):
    """`--recipe best` trains in channels_last: model.pt2 is written from contiguous weights (torch's
    archive writer warns about non-contiguous ones) and gives the model's own logits."""
    import warnings

    from mnist_dist.models import PoolFirstCNN
    from mnist_dist.outputs.export import save_export

    torch.manual_seed(0)
    model = PoolFirstCNN().to(memory_format=torch.channels_last).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_export(model, normalize=True, run_dir=tmp_path)
    pixels = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = model((pixels - 0.1307) / 0.3081)
        assert torch.allclose(torch.export.load(str(tmp_path / "model.pt2")).module()(pixels), expected, atol=1e-5)
