"""The package layout: no import cycles between mnist_dist modules, no import from a lower layer up to
a higher one, light imports on the default path, and the core's size held to its ceilings. The import
graph is built from the source with ``ast`` (every ``import``, also those inside functions), so a cycle
or an upward import hidden in a function-level import is still found."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import QUIET, REPO, child_env, ok, python

PACKAGE = REPO / "mnist_dist"


def module_name(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a (possibly relative) import inside ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the mnist_dist modules it imports (a package's import also means its __init__)."""
    modules = {module_name(p, package.parent): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, is_package, node.level, node.module)
                # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c: the nearest known module counts
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("mnist_dist"):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


# The layers, bottom first: a module imports from its own layer and the ones below, never from above.
# (A package's modules share its layer.) README's code map lists the same.
LAYERS = (
    ("errors", "console"),
    ("config", "config_file", "rng", "callbacks", "lagged"),
    ("dist", "addresses", "models", "data"),
    ("engines", "metrics", "optim", "clock", "stopping"),
    ("checkpoint", "dcp", "elastic", "trainer", "outputs", "diagnostics", "faults"),
    ("train",),
    ("entry", "cli", "tools", "launchers", "sweep", "preflight", "__main__", ""),
)
# Ceilings of the core path (``python train_ddp.py --max-steps 30``, coverage.py): it may not regrow.
# 1,350 when the layout was made (1,337 then); raised once, to 1,500, for what every run must now do to
# keep its run directory safe (its claim on the directory, checkpoint checksums, signals from the first
# line: +142 statements, 1,479 then; docs/code-map.md itemises them). Raise it again only that way.
MAX_CORE_STATEMENTS, MAX_CORE_MODULES = 1500, 30
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 350


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layout.py")


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """``a -> b`` for every import of a module ``b`` in a higher layer than ``a``'s."""
    graph = import_graph(package)
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def test_no_import_from_a_lower_layer_up():
    assert upward_imports() == []


def test_the_layer_check_names_an_upward_import(tmp_path):
    pkg = tmp_path / "mnist_dist"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from .train import fit\n")
    (pkg / "train.py").write_text("from .config import f\n")
    assert upward_imports(pkg) == ["mnist_dist.config -> mnist_dist.train"]


def test_no_function_or_module_is_too_long():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, too_long


@pytest.mark.slow
def test_the_core_path_stays_small(small_mnist, tmp_path):
    """What a default run executes (coverage.py, as benchmarks/core_size.py measures it) stays under
    its ceilings; the figure itself is in docs/code-map.md."""
    pytest.importorskip("coverage")
    data = tmp_path / ".coverage"
    env = child_env(COVERAGE_FILE=str(data), PYTHONPATH=str(REPO))
    ok(python("-m", "coverage", "run", "--rcfile=/dev/null", "--source=mnist_dist", str(REPO / "train_ddp.py"),
              "--max-steps", "30", "--data-dir", str(small_mnist), "--out-dir", str(tmp_path / "run"),
              "--no-progress", env=env, cwd=tmp_path, timeout=300))
    ok(python("-m", "coverage", "json", "--rcfile=/dev/null", "-q", "-o", str(tmp_path / "cov.json"), env=env,
              cwd=tmp_path))
    files = json.loads((tmp_path / "cov.json").read_text())["files"]
    executed = {f: len(i["executed_lines"]) for f, i in files.items() if i["executed_lines"]}
    assert len(executed) > 15 and sum(executed.values()) > 500, "coverage did not follow the run"
    assert sum(executed.values()) <= MAX_CORE_STATEMENTS, sorted(executed.items(), key=lambda kv: -kv[1])
    assert len(executed) <= MAX_CORE_MODULES, sorted(executed)


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and graph["mnist_dist.train"], "the graph was not built"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_names_a_cycle(tmp_path):
    """The checker itself: a package with a cycle hidden in a function-level import is caught."""
    pkg = tmp_path / "mnist_dist"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import mnist_dist.a\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"mnist_dist.a", "mnist_dist.sub.b", "mnist_dist.c"}, cycle


def test_default_run_imports_no_optional_packages(small_mnist, tmp_path):
    """A default run without pictures and export imports none of torchvision, matplotlib, wandb,
    accelerate, tensorboard, ray, optuna or yaml (each costs start-up seconds it does not use), nor our
    Ray launcher: every import of the real process is listed by ``python -X importtime``. (torch._dynamo is not on the list: torch.optim's optimizers
    import it on construction, ~1.6 s here, in every torch training script.)"""
    proc = ok(python("-X", "importtime", str(REPO / "train_ddp.py"), "--data-dir", str(small_mnist),
                     "--out-dir", str(tmp_path / "run"), "--max-steps", "2", *QUIET, timeout=180))
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "mnist_dist.train" in imported, "importtime listed nothing"
    optional = ("torchvision", "matplotlib", "wandb", "accelerate", "tensorboard", "ray", "optuna", "yaml")
    heavy = sorted(m for m in imported if m.split(".")[0] in optional or m.startswith("mnist_dist.launchers"))
    assert not heavy, f"the default path imported {heavy}"
    assert "mnist_dist.cli" not in imported, "a training run imported the subcommand table"


def test_the_train_help_names_every_other_command():
    from mnist_dist import cli, entry

    assert set(entry.OTHER_COMMANDS) == set(cli.COMMANDS) - {"train"}
