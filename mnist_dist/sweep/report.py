"""The sweep's outputs in its directory: trials.csv, best.toml (a ``--config`` file), sweep.png.

All three are rewritten atomically from the study (its storage is the truth) whenever a trial ends,
so an interrupted sweep leaves them current.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..config_file import RUN_LOCATION_KEYS
from ..outputs.rundir import atomic_path, atomic_write_bytes

SUMMARY_COLUMNS = ("test_accuracy", "test_correct", "test_loss", "train_seconds", "seconds_to_target",
                   "epochs", "global_step", "world_size")


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / f"trial-{number:04d}"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def write_trials_csv(study: Any, sweep_dir: Path, param_names: list[str]) -> Path:
    """One row per trial: number, state, the metric, the swept values, the run's summary figures."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "value", *param_names, *SUMMARY_COLUMNS, "wall_seconds", "run_dir"])
    for t in study.get_trials(deepcopy=False):
        summary = read_summary(trial_dir(sweep_dir, t.number)) or {}
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
        writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                         *[t.params.get(name, "") for name in param_names],
                         *["" if summary.get(c) is None else summary[c] for c in SUMMARY_COLUMNS],
                         f"{wall:.1f}" if wall != "" else "", trial_dir(sweep_dir, t.number)])
    path = sweep_dir / "trials.csv"
    atomic_write_bytes(path, out.getvalue().encode())
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def write_best_toml(study: Any, sweep_dir: Path, metric: str) -> Path | None:
    """The best finished trial's whole resolved config (its config.json without where it ran): usable
    as ``--config`` and it reproduces that trial. The swept values come first."""
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return None
    run = trial_dir(sweep_dir, best.number)
    try:
        config = json.loads((run / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None
    config = {k: v for k, v in config.items() if k not in RUN_LOCATION_KEYS}
    lines = [f"# best trial {best.number} of the sweep in {sweep_dir}: {metric} = {best.value}",
             f"# its run directory: {run}",
             f"# use: python train_ddp.py --config {sweep_dir / 'best.toml'} [--out-dir DIR]",
             "", "# swept"]
    lines += [f"{k} = {toml_value(config[k])}" for k in sorted(best.params) if k in config]
    lines += ["", "# fixed (the trial's resolved config)"]
    lines += [f"{k} = {toml_value(v)}" for k, v in sorted(config.items()) if k not in best.params]
    path = sweep_dir / "best.toml"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _figure_image(draw: Any, study: Any) -> Any:
    """optuna's matplotlib plot drawn on its own figure, as an image array."""
    import matplotlib.pyplot as plt

    ax = draw(study)
    fig = ax.figure if hasattr(ax, "figure") else ax.flatten()[0].figure
    fig.set_size_inches(7, 4.5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return plt.imread(buf)


def draw_sweep_png(study: Any, sweep_dir: Path) -> Path | None:
    """Optimization history beside parameter importances (optuna.visualization.matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return None
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return None  # nothing to draw yet
    panels = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's "experimental" warnings
        for title, draw in (("optimization history", ovm.plot_optimization_history),
                            ("parameter importances", ovm.plot_param_importances)):
            try:
                panels.append((title, _figure_image(draw, study)))
            except Exception as exc:  # e.g. importances need two completed trials
                panels.append((title, f"{title}: not available yet\n({' '.join(str(exc).split())[:80]})"))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, (title, panel) in zip(axes, panels):
        ax.axis("off")
        if isinstance(panel, str):
            ax.text(0.5, 0.5, panel, ha="center", va="center", wrap=True)
        else:
            ax.imshow(panel)
    fig.tight_layout()
    path = sweep_dir / "sweep.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
