"""``--config FILE`` (TOML, YAML, JSON): any training flag from a file, explicit flags win, bad keys are
one ``error:`` line, and a run's own config.json reproduces the run (real runs, real files)."""

from __future__ import annotations

import sys

import pytest

from conftest import QUIET, REPO, TRAIN_SCRIPT, assert_one_line_error, python, read_json, read_jsonl

from mnist_dist.entry import parse_train_args
from mnist_dist.errors import UserError


def test_toml_yaml_json_set_flags_and_explicit_flags_win(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('recipe = "best"\nlr = 0.003\nbetas = [0.8, 0.95]\nbatch-size = 128\naugment = false\n')
    cfg = parse_train_args(["--config", str(toml), "--out-dir", str(tmp_path / "r")], world_size=1)
    assert (cfg.recipe, cfg.lr, cfg.betas, cfg.batch_size, cfg.augment) == ("best", 0.003, (0.8, 0.95), 128, False)
    assert (cfg.epochs, cfg.model, cfg.channels_last) == (15, "best2", True)  # the rest from the file's recipe
    cfg = parse_train_args(["--config", str(toml), "--lr", "0.01", "--recipe", "fast", "--augment",
                            "--out-dir", str(tmp_path / "r")], world_size=1)
    assert (cfg.recipe, cfg.lr, cfg.augment, cfg.model, cfg.batch_size) == ("fast", 0.01, True, "fast", 128)

    yaml = tmp_path / "c.yaml"
    yaml.write_text("lr: 0.02\nseed: 4\nnormalize: false\n")
    cfg = parse_train_args(["--config", str(yaml), "--out-dir", str(tmp_path / "r")], world_size=1)
    assert (cfg.recipe, cfg.lr, cfg.seed, cfg.normalize) == ("fast", 0.02, 4, False)

    js = tmp_path / "c.json"
    js.write_text('{"epochs": 3, "weight_decay": 0}')
    cfg = parse_train_args(["--config", str(js), "--out-dir", str(tmp_path / "r")], world_size=1)
    assert (cfg.epochs, cfg.weight_decay) == (3, 0.0) and isinstance(cfg.weight_decay, float)


def test_the_shipped_recipe_files_resolve_to_what_they_say(tmp_path):
    """sweeps/*.toml are documented commands: the old recipe and the sweep's winner stay on the
    model they were measured with (recipe best-v1) after `--recipe best` moved on."""
    def resolve(name: str):
        return parse_train_args(["--config", str(REPO / "sweeps" / name), "--out-dir", str(tmp_path / "r")],
                                world_size=1)

    v1 = resolve("best-recipe-v1.toml")
    assert (v1.recipe, v1.model, v1.epochs, v1.channels_last, v1.lr, v1.batch_size) == \
        ("best-v1", "best", 10, False, 0.005, 256)
    trial9 = resolve("best-recipe-trial9.toml")
    assert (trial9.model, trial9.epochs, trial9.batch_size, trial9.lr) == ("best", 10, 128, 0.0034)
    best = parse_train_args(["--recipe", "best", "--out-dir", str(tmp_path / "r")], world_size=1)
    assert (best.model, best.epochs, best.channels_last, best.augment) == ("best2", 15, True, True)


def test_grad_accum_takes_an_int_and_nan_is_mistyped(tmp_path):
    """grad-accum = 2 in a file, as the flag --grad-accum 2 (the field is a str: "auto" or a number);
    NaN passes no numeric check."""
    toml = tmp_path / "c.toml"
    toml.write_text("grad-accum = 2\n")
    cfg = parse_train_args(["--config", str(toml), "--out-dir", str(tmp_path / "r")], world_size=1)
    assert cfg.grad_accum == "2"
    toml.write_text('grad-accum = "auto"\nmax-micro-batch = 64\n')
    cfg = parse_train_args(["--config", str(toml), "--out-dir", str(tmp_path / "r")], world_size=1)
    assert (cfg.grad_accum, cfg.max_micro_batch) == ("auto", 64)
    for text, needle in (("grad-accum = true\n", "grad_accum (expected 'auto' or a positive int, got bool True)"),
                         ("grad-accum = -2\n", "grad_accum (expected 'auto' or a positive int, got int -2)"),
                         ("lr = nan\n", "lr (expected finite float, got float nan)"),
                         ("lr = inf\n", "lr (expected finite float, got float inf)"),
                         ("betas = [0.9, nan]\n", "betas (expected two numbers")):
        toml.write_text(text)
        with pytest.raises(UserError) as info:
            parse_train_args(["--config", str(toml), "--out-dir", str(tmp_path / "r")], world_size=1)
        assert needle in str(info.value), (text, str(info.value))


def test_bad_config_files_are_one_error_line(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = 0.02\nepochs = "3"\nfoo = 1\nbatch-size = 2.5\nbetas = [0.9]\n'
                   'weight-decay = nan\ngrad-accum = 0\n')
    line = assert_one_line_error(cli("--config", bad), "unknown keys: foo",
                                 "epochs (expected int", "batch_size (expected int", "betas (expected two",
                                 "weight_decay (expected finite float, got float nan",
                                 "grad_accum (expected 'auto' or a positive int, got int 0")
    assert "lr" not in line.split("mistyped")[1].replace("expected", "")  # a good key is not named
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = \n")
    assert_one_line_error(cli("--config", broken), "not valid TOML")
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    assert_one_line_error(cli("--config", listing), "expected a mapping")
    assert_one_line_error(cli("--config", tmp_path / "none.toml"), "no such file")
    assert_one_line_error(cli("--config", tmp_path / "x.ini"), "unknown file type")
    # a value that has the right type but is invalid goes through the usual checks
    neg = tmp_path / "neg.toml"
    neg.write_text("epochs = -1\n")
    result = cli("--config", neg)
    assert result.returncode == 2
    assert_one_line_error(result, "--epochs must be a positive")


def test_bad_config_file_from_a_shell_is_one_line_and_exit_2(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = \n")
    proc = python(str(TRAIN_SCRIPT), "--config", str(broken), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "not valid TOML")


def test_yaml_without_pyyaml_is_one_error_line(cli, tmp_path, monkeypatch):
    yaml = tmp_path / "c.yml"
    yaml.write_text("lr: 0.02\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` fails, as without PyYAML installed
    result = cli("--config", yaml)
    assert result.returncode == 2
    assert_one_line_error(result, "YAML needs PyYAML")


def test_run_config_json_reproduces_the_run(cli, small_mnist, tmp_path):
    """Run A with non-default flags; ``--config A/config.json --out-dir B`` gives the same test_correct,
    the same per-epoch metrics and the same config (but its own run directory). Both in this process."""
    a, b = tmp_path / "A", tmp_path / "B"
    data = {"MNIST_DATA_DIR": str(small_mnist)}  # a run's config.json does not carry its data directory
    assert cli("--out-dir", a, "--max-steps", "40", "--seed", "3", "--lr", "0.02", "--batch-size", "128",
               "--eval-every", "20", *QUIET, env=data).returncode == 0
    assert cli("--config", a / "config.json", "--out-dir", b, env=data).returncode == 0
    sa, sb = read_json(a / "summary.json"), read_json(b / "summary.json")
    assert sa["test_correct"] == sb["test_correct"] and sa["test_loss"] == sb["test_loss"]
    assert sb["global_step"] == 40
    ca, cb = read_json(a / "config.json")["config"], read_json(b / "config.json")["config"]
    assert cb["out_dir"] == str(b) and ca["out_dir"] == str(a)
    assert {k: v for k, v in ca.items() if k != "out_dir"} == {k: v for k, v in cb.items() if k != "out_dir"}
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [m["test_correct"] for m in ma] == [m["test_correct"] for m in mb]
    # every exact evaluation is in evaluations.jsonl (mid-epoch every 20 steps, then the epoch end)
    evals = read_jsonl(b / "evaluations.jsonl")
    assert [(e["global_step"], e["kind"], e["images_seen"]) for e in evals] == \
        [(20, "step", 20 * 128), (40, "step", 40 * 128), (40, "epoch", 40 * 128)]
    assert evals[-1]["test_correct"] == sb["test_correct"]
    # an explicit flag still wins over the run's config.json
    c = parse_train_args(["--config", str(a / "config.json"), "--seed", "5", "--out-dir", str(tmp_path / "C")],
                         world_size=1)
    assert (c.seed, c.lr, c.batch_size, c.max_steps) == (5, 0.02, 128, 40)
