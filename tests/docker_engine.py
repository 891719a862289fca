"""A Docker engine and a locally made base image for tests/test_docker.py (no registry is reachable).

``Engine(log_dir).start()`` uses the daemon that answers ``docker info`` or, as root, starts ``dockerd`` in the
background (stopped by PID afterwards); it returns why not when neither works. ``standin_base()``
makes a small stand-in for a PyTorch base image: Debian bookworm from ``debootstrap`` (the Debian
mirror apt uses here), imported with ``docker import``, plus a venv with a CPU torch wheel — a local one
(``$MNIST_DIST_TORCH_WHEEL``, else pip's find-links), else torch from the package index. pip inside the
builds reaches the index the way this machine's pip does: its CA file (``$PIP_CERT`` / ``pip config``)
goes into the image as ``PIP_CERT``. Both images are cached by tag (the tag hashes their recipe), so
later runs on the same machine reuse them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"  # Debian 12: python3 is 3.11, so cp311 wheels fit
PYTAG = "cp311"
PACKAGES = "python3,python3-venv,ca-certificates,passwd"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def docker(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    # the classic builder: the same output ("Step N/M", "Using cache") whatever builder plugins exist
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=kwargs.pop("stdin", subprocess.DEVNULL), **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
                           f"{proc.stderr[-4000:]}")
    return proc


def daemon_answers(timeout: float = 20) -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=timeout, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Engine:
    """The Docker daemon for the tests: an existing one, or one started here (and stopped by ``stop``)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.why_not = ""

    def start(self) -> bool:
        if shutil.which("docker") is None:
            self.why_not = "no docker client (apt-get install docker.io; .ci/run does)"
            return False
        if daemon_answers():
            return True
        dockerd = shutil.which("dockerd", path=SBIN)
        if dockerd is None or os.geteuid() != 0:
            self.why_not = ("no Docker daemon answers and none can be started here "
                            f"({'dockerd not installed' if dockerd is None else 'not root'}; .ci/run starts one)")
            return False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / "dockerd.log", "wb")
        self.proc = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if daemon_answers(10):
                return True
            if self.proc.poll() is not None and not daemon_answers(10):
                break
            time.sleep(1)
        tail = (self.log_dir / "dockerd.log").read_text(errors="replace").splitlines()[-5:]
        self.why_not = "dockerd did not start: " + " | ".join(tail)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, timeout=60, check=False).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources), else deb.debian.org."""
    if os.environ.get("MNIST_DIST_DEBIAN_MIRROR"):
        return os.environ["MNIST_DIST_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?(?=\s|$)", text, re.M):
            return match.group(1)
    return "http://deb.debian.org/debian"


def pip_config(key: str) -> list[str]:
    """Values of a pip setting: $PIP_<KEY>, then `pip config list` (global/user/site/env)."""
    values = os.environ.get(f"PIP_{key.upper().replace('-', '_')}", "").split()
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        if name.rsplit(".", 1)[-1] == key:
            values += value.strip().strip("'\"").split()
    return values


def ca_file() -> Path | None:
    for value in pip_config("cert"):
        if Path(value).is_file():
            return Path(value)
    return None


def local_torch_wheel() -> Path | None:
    """A CPU torch wheel for the stand-in's Python: $MNIST_DIST_TORCH_WHEEL, else in pip's find-links."""
    if os.environ.get("MNIST_DIST_TORCH_WHEEL"):
        return Path(os.environ["MNIST_DIST_TORCH_WHEEL"])
    found = []
    for folder in pip_config("find-links"):
        folder = folder.removeprefix("file://")
        if Path(folder).is_dir():
            found += Path(folder).glob(f"torch-*+cpu-{PYTAG}-{PYTAG}-*linux*x86_64.whl")

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.name.split("-")[1].split("+")[0]))

    return max(found, key=version) if found else None


def rootfs_image(work: Path, log) -> str:
    tag = f"mnist-dist-test-rootfs:{SUITE}-{hashlib.sha256(PACKAGES.encode()).hexdigest()[:8]}"
    if image_exists(tag):
        return tag
    debootstrap = shutil.which("debootstrap", path=SBIN)
    if debootstrap is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap; .ci/run does)")
    root = work / "rootfs"
    mirror = debian_mirror()
    log(f"debootstrap {SUITE} from {mirror} (about a minute)")
    proc = subprocess.run([debootstrap, "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root), mirror],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    try:
        docker("import", "-", tag, stdin=tar.stdout, timeout=600)
    finally:
        tar.stdout.close()
        tar.wait()
    shutil.rmtree(root, ignore_errors=True)
    return tag


def standin_base(log=print) -> str:
    """The stand-in PyTorch base image (built once per recipe, then found by its tag)."""
    wheel, ca = local_torch_wheel(), ca_file()
    torch_spec = wheel.name if wheel else "torch==2.14.*"
    recipe = f"{SUITE} {PACKAGES} {torch_spec} ca={bool(ca)} v1"
    tag = f"mnist-dist-test-base:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if image_exists(tag):
        return tag
    work = Path(tempfile.mkdtemp(prefix="mnist-dist-base-", dir="/var/tmp"))
    try:
        rootfs = rootfs_image(work, log)
        context = work / "context"
        context.mkdir()
        lines = [f"FROM {rootfs}"]
        if ca:
            shutil.copy(ca, context / "pip-ca.crt")
            lines += ["COPY pip-ca.crt /usr/local/share/pip-ca.crt", "ENV PIP_CERT=/usr/local/share/pip-ca.crt"]
        lines += ["ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1"]
        if wheel:
            shutil.copy(wheel, context / wheel.name)
            lines += [f"COPY {wheel.name} /tmp/", f"RUN python3 -m venv /opt/venv && pip install /tmp/{wheel.name} "
                      f"&& rm /tmp/{wheel.name}"]
        else:
            lines += [f"RUN python3 -m venv /opt/venv && pip install '{torch_spec}'"]
        lines += ['RUN python -c "import torch; print(\'stand-in base: torch\', torch.__version__)"']
        (context / "Dockerfile").write_text("\n".join(lines) + "\n")
        log(f"building the stand-in base {tag} (torch: {torch_spec})")
        docker("build", "-t", tag, str(context), timeout=1800)
        return tag
    finally:
        shutil.rmtree(work, ignore_errors=True)
