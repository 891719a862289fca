"""The package layout: no import cycles between mnist_dist modules, and light imports on the
default path. The import graph is built from the source with ``ast`` (every ``import``, also those
inside functions), so a cycle hidden in a function-level import is still found."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import QUIET, REPO, ok, python

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
