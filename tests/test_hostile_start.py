"""Start-up mistakes that once ended in a traceback, a hang or a run trained to NaN: a number that is
not finite, and a rendezvous environment that cannot work (a rank started by hand with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: the "env" launcher). Each is one ``error:``
line (``[rank N] error:`` under a launcher) and exit code 2, within --dist-timeout and a margin.

The numbers are checked in this process (``cli``); the rendezvous in real processes on real sockets."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time

import pytest

from conftest import QUIET, TRAIN_SCRIPT, assert_one_line_error, child_env, free_port, python
from mnist_dist.config import TrainConfig

TIMEOUT_S = 5  # --dist-timeout of the rendezvous cases
FLOAT_FLAGS = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig) if f.type in ("float", float)]


# ----------------------------------------------------------------------------- numbers that are not finite
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_every_float_flag_refuses_what_is_not_finite(cli, tmp_path, flag, value):
    """Each float flag (the list comes from TrainConfig, so a new one is covered too)."""
    result = cli(*QUIET, f"{flag}={value}", "--no-download", "--data-dir", tmp_path, "--out-dir", tmp_path / "run")
    assert result.returncode == 2, result
    line = assert_one_line_error(result, flag, value.lstrip("-"))
    assert result.stderr.strip() == line and line.startswith(f"error: {flag} "), result.stderr
    assert not (tmp_path / "run").exists()


def test_the_float_flags_are_all_found():
    assert {"--lr", "--weight-decay", "--label-smoothing", "--grad-clip", "--dist-timeout", "--aug-degrees",
            "--aug-shift", "--aug-scale", "--target-accuracy"} <= set(FLOAT_FLAGS), FLOAT_FLAGS


@pytest.mark.parametrize("args, line", [
    (["--lr", "inf"], "error: --lr must be a finite number, got inf"),  # trained to NaN and exited 0
    (["--dist-timeout", "inf"], "error: --dist-timeout must be a finite number, got inf"),
    (["--grad-clip", "inf"], "error: --grad-clip must be a finite number, got inf"),
    (["--lr", "nan"], "error: --lr must be positive, got nan"),  # the range checks keep their words
    (["--betas", "0.9", "inf"], "error: --betas must be two numbers in [0, 1), got 0.9 inf"),
    (["--betas", "nan", "0.9"], "error: --betas must be two numbers in [0, 1), got nan 0.9"),
])
def test_non_finite_numbers_are_named(cli, tmp_path, args, line):
    result = cli(*QUIET, *args, "--no-download", "--data-dir", tmp_path, "--out-dir", tmp_path / "run")
    assert (result.returncode, result.stderr.strip()) == (2, line)


# ----------------------------------------------------------------------------- the rendezvous
def start_rank(rank: int, addr: str, port: int | str, out, data, timeout_s: float = TIMEOUT_S):
    """One rank of a 2-rank job started by hand; (the process, its wall time in seconds)."""
    env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR=addr,
                    MASTER_PORT=str(port))
    start = time.monotonic()
    proc = python(str(TRAIN_SCRIPT), "--max-steps", "1", "--data-dir", str(data), "--out-dir", str(out),
                  "--dist-timeout", str(timeout_s), *QUIET, env=env, timeout=timeout_s + 60)
    return proc, time.monotonic() - start


def one_error_line(proc, rank: int, *needles: str) -> str:
    """Exit 2 and stderr is exactly one ``[rank N] error:`` line: no traceback, no c10d log."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[rank {rank}] error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("rank, port", [(0, "abc"), (1, "abc"), (0, "0"), (1, "70000"), (0, ""), (1, "-5")])
def test_a_master_port_that_is_no_port(small_mnist, tmp_path, rank, port):
    proc, seconds = start_rank(rank, "127.0.0.1", port, tmp_path / "run", small_mnist)
    one_error_line(proc, rank, f"MASTER_PORT={port!r} is not a TCP port (1-65535)", "MASTER_ADDR='127.0.0.1'")
    assert seconds < 30  # refused before any waiting


def test_rank_0_on_a_port_already_in_use(small_mnist, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, seconds = start_rank(0, "127.0.0.1", port, tmp_path / "run", small_mnist)
    one_error_line(proc, 0, f"MASTER_PORT {port} is already in use", f"127.0.0.1:{port}", "free port")
    assert seconds < 30  # at once, not after --dist-timeout


@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_master_addr_that_does_not_resolve(small_mnist, tmp_path, rank):
    """Waited for up to --dist-timeout (a Kubernetes service's name may resolve late), then named."""
    proc, seconds = start_rank(rank, "no-such-host.invalid", 29500, tmp_path / "run", small_mnist)
    one_error_line(proc, rank, "no-such-host.invalid:29500", "does not resolve", "check its spelling")
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 30


def test_rank_1_when_nothing_listens_on_master_port(small_mnist, tmp_path):
    """Rank 0 never started (or another port): rank 1 retries for --dist-timeout, then says what to check."""
    port = free_port()
    proc, seconds = start_rank(1, "127.0.0.1", port, tmp_path / "run", small_mnist)
    one_error_line(proc, 1, f"127.0.0.1:{port}", "Connection refused", "rank 0 is running", "firewall")
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 30


@pytest.mark.slow
def test_rank_1_with_an_unreachable_master_addr(small_mnist, tmp_path):
    """10.255.255.1 routes nowhere on most networks (a connection attempt times out); behind a
    transparent proxy something answers that is not a store: either way one line naming it."""
    proc, seconds = start_rank(1, "10.255.255.1", 29500, tmp_path / "run", small_mnist)
    one_error_line(proc, 1, "10.255.255.1:29500", "--dist-timeout 5 s", "check")
    assert seconds < TIMEOUT_S + 30


@pytest.mark.slow
def test_rank_1_when_another_service_answers_on_master_port(small_mnist, tmp_path):
    """A server that is not torch's store (here one that answers like a web server): torch's client
    logs each failed handshake with a C++ stack before it raises; what is left is one line."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        proc, seconds = start_rank(1, "127.0.0.1", port, tmp_path / "run", small_mnist)
    finally:
        server.close()
    one_error_line(proc, 1, f"127.0.0.1:{port}", "cannot create the process group", "MASTER_PORT and WORLD_SIZE")
    assert seconds < TIMEOUT_S + 30


@pytest.mark.slow
def test_rank_0_alone_when_the_other_ranks_never_come(small_mnist, tmp_path):
    """WORLD_SIZE=2 but rank 1 never starts: rank 0 waits --dist-timeout for it, then one line."""
    port = free_port()
    proc, seconds = start_rank(0, "127.0.0.1", port, tmp_path / "run", small_mnist)
    one_error_line(proc, 0, f"127.0.0.1:{port}", "1/2 clients joined", "WORLD_SIZE")
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 30


# ----------------------------------------------------------------------------- c10d's log, held
def test_native_stderr_is_written_out_unless_replaced_by_one_line(capfd):
    """What reaches file descriptor 2 while the group is created (C++ writes there, not to
    sys.stderr) comes out afterwards; when the failure became a UserError it is dropped."""
    from mnist_dist.dist import native_stderr_held
    from mnist_dist.errors import UserError

    with native_stderr_held():
        os.write(2, b"a native warning\n")
        assert "a native warning" not in capfd.readouterr().err  # held, not yet written
    assert capfd.readouterr().err == "a native warning\n"
    with pytest.raises(UserError), native_stderr_held():
        os.write(2, b"[W TCPStore.cpp] retrying\nframe #0: ...\n")
        raise UserError("one line")
    with pytest.raises(RuntimeError), native_stderr_held():
        os.write(2, b"kept with a traceback\n")
        raise RuntimeError("a bug")
    assert capfd.readouterr().err == "kept with a traceback\n"
