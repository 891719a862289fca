"""The size of the core path: what a default run executes, and the shape of the package.

    MNIST_DATA_DIR=../shared/data python benchmarks/core_size.py

Runs ``python train_ddp.py --max-steps 30`` under coverage.py (``--source=mnist_dist``, this process
only: the pictures' second process is not counted) and prints the statements of ``mnist_dist/`` it
executed and the modules they are in; then, from the source, the longest functions and modules and any
import from a lower layer up to a higher one (the layers: ``tests/test_layout.py``). Needs coverage.py
(``pip install coverage``). ``tests/test_layout.py`` holds the same figures to their ceilings.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def core_path(args: list[str]) -> dict[str, int]:
    """{module file: statements executed} of a default run (``train_ddp.py *args``)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / ".coverage"
        env = dict(os.environ, COVERAGE_FILE=str(data), PYTHONPATH=str(REPO))
        run = [sys.executable, "-m", "coverage", "run", "--rcfile=/dev/null", "--source=mnist_dist",
               str(REPO / "train_ddp.py"), *args, "--out-dir", str(Path(tmp) / "run")]
        proc = subprocess.run(run, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"the run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        report = Path(tmp) / "coverage.json"
        subprocess.run([sys.executable, "-m", "coverage", "json", "--rcfile=/dev/null", "-q", "-o", str(report)],
                       env=env, cwd=tmp, check=True, timeout=120)
        files = json.loads(report.read_text())["files"]
    return {str(Path(f).resolve().relative_to(REPO)): len(i["executed_lines"])
            for f, i in files.items() if i["executed_lines"]}


def longest(package: Path = REPO / "mnist_dist") -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, name) of every function and every module, longest first."""
    functions, modules = [], []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        name = str(path.relative_to(REPO))
        modules.append((len(source.splitlines()), name))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(functions, reverse=True), sorted(modules, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("args", nargs="*", default=["--max-steps", "30"], help="train_ddp.py's flags")
    args = parser.parse_args()
    executed = core_path(args.args)
    print(f"python train_ddp.py {' '.join(args.args)}: {sum(executed.values())} statements of mnist_dist/ "
          f"executed, in {len(executed)} modules")
    for name, count in sorted(executed.items(), key=lambda kv: -kv[1]):
        print(f"  {count:4d}  {name}")
    functions, modules = longest()
    print("longest functions: " + ", ".join(f"{name} ({n} lines)" for n, name in functions[:5]))
    print("longest modules: " + ", ".join(f"{name} ({n} lines)" for n, name in modules[:5]))
    sys.path.insert(0, str(REPO / "tests"))
    from test_layout import upward_imports

    found = upward_imports()
    print("imports from a lower layer up to a higher one: " + (", ".join(found) if found else "none"))


if __name__ == "__main__":
    main()
