"""Install mnist-dist's dependencies into an image, keeping the base image's torch and torchvision.

    python install-deps.py [EXTRA ...]        # in the directory holding pyproject.toml (Dockerfile, .def)

Installs [project] dependencies, the named optional extras (the images use ``track``: pictures and
wandb) and the build requirements (so the code layer installs offline with --no-build-isolation).
torch and torchvision are never installed or replaced: the base image's are a pair built together
(a PyPI torchvision beside a base's +cpu/+cuXXX torch does not load), and pip is constrained to the
installed versions so that no dependency can pull another torch. A base without torch is an error;
a base without torchvision is allowed (the default training path does not need it; ``--loader
dataloader`` and downloading MNIST do).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
import tempfile

KEEP_FROM_BASE = ("torch", "torchvision")


def load_pyproject(path: str = "pyproject.toml") -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "tomli"], check=True)
        import tomli as tomllib
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(extras: list[str]) -> int:
    project = load_pyproject()
    optional = project["project"].get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        print(f"error: no extra {', '.join(unknown)} in pyproject.toml (have: {', '.join(optional)})", file=sys.stderr)
        return 2
    wanted = list(project["project"].get("dependencies", []))
    for extra in extras:
        wanted += optional[extra]
    wanted += project.get("build-system", {}).get("requires", [])
    kept = {name: installed(name) for name in KEEP_FROM_BASE}
    if kept["torch"] is None:
        print("error: the base image has no torch; build from a PyTorch image (BASE_IMAGE)", file=sys.stderr)
        return 2
    requirements = [r for r in wanted if name_of(r) not in KEEP_FROM_BASE]
    pins = [f"{name}=={version}" for name, version in kept.items() if version]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(pins) + "\n")
        constraints = fh.name
    print(f"keeping the base's {', '.join(pins)}; installing: {' '.join(requirements)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "-c", constraints, *requirements],
                   check=True)
    after = {name: installed(name) for name in KEEP_FROM_BASE}
    if after != kept:
        print(f"error: pip changed the base's packages: {kept} -> {after}", file=sys.stderr)
        return 2
    if kept["torchvision"] is None:
        print("note: no torchvision in the base: --loader dataloader and downloading MNIST are unavailable in "
              "this image (mount the data)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
