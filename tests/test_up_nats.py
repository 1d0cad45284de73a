"""`imagegen up`'s embedded nats-server as real processes: it dies with a `kill -9` of `up`, a data dir
serves one `up` at a time (a second refuses with one line and exit code 2), `--nats-port` picks its port,
and its stderr is read into the log, so hundreds of garbage connections leave it accepting. The worker
is the simulated engine, to keep each `up` cheap."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import psutil
import pytest

from imagegen.embedded_nats import free_port
from tests.helpers.real_processes import up_ready

pytestmark = pytest.mark.processes  # each test starts imagegen or nats-server processes of its own

GARBAGE_CONNECTIONS = 800


def up(data_dir: Path, log_path: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "imagegen", "up", "--model", "simulated", "--data-dir", str(data_dir), *flags],
            stdout=log, stderr=log, env=env,
        )


def nats_server_of(proc: subprocess.Popen) -> psutil.Process:
    (server,) = [child for child in psutil.Process(proc.pid).children() if child.name().startswith("nats-server")]
    return server


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
async def running(tmp_path_factory):
    """(the `up` process, its data dir, its log, its NATS port), one `up` for the module."""
    root = tmp_path_factory.mktemp("up-nats")
    port, nats_port = free_port(), free_port()
    log_path = root / "up.log"
    proc = up(root / "data", log_path, "--port", str(port), "--nats-port", str(nats_port))
    try:
        await up_ready(proc, f"http://127.0.0.1:{port}", log_path, timeout=90)
        yield proc, root / "data", log_path, nats_port
    finally:
        stop(proc)


async def test_the_embedded_server_listens_on_nats_port(running):
    proc, _, _, nats_port = running
    assert any(c.laddr.port == nats_port for c in nats_server_of(proc).net_connections("tcp") if c.status == psutil.CONN_LISTEN)


async def test_a_second_up_on_the_same_data_dir_refuses_with_one_line(running, tmp_path):
    _, data_dir, _, _ = running
    second = subprocess.run(
        [sys.executable, "-m", "imagegen", "up", "--model", "simulated", "--data-dir", str(data_dir), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, lines
    assert f"the data dir {data_dir} is in use" in lines[0] and "another --data-dir" in lines[0]


async def test_a_busy_nats_port_is_refused_with_one_line(running, tmp_path):
    _, _, _, nats_port = running
    second = subprocess.run(
        [sys.executable, "-m", "imagegen", "up", "--model", "simulated", "--data-dir", str(tmp_path), "--nats-port", str(nats_port)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1 and f"--nats-port {nats_port} is in use" in lines[0], lines


def garbage_connections(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GARBAGE \x00\xff\r\n")


async def test_hundreds_of_garbage_connections_leave_the_server_accepting(running):
    proc, _, log_path, nats_port = running
    await asyncio.to_thread(garbage_connections, nats_port, GARBAGE_CONNECTIONS)
    deadline = time.monotonic() + 30
    while log_path.read_text(errors="replace").count("Client parser ERROR") < GARBAGE_CONNECTIONS and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert log_path.read_text(errors="replace").count("Client parser ERROR") >= GARBAGE_CONNECTIONS  # every line drained into the log
    nc = await nats.connect(f"nats://127.0.0.1:{nats_port}", connect_timeout=5, max_reconnect_attempts=0)
    try:
        assert (await nc.request("$JS.API.INFO", b"", timeout=5)).data
    finally:
        await nc.close()
    held = [c for c in nats_server_of(proc).net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED]
    assert len(held) < 50, f"{len(held)} connections still open"  # the bad ones were closed


async def test_kill_9_of_up_takes_its_server_along_and_frees_the_data_dir(tmp_path):
    port = free_port()
    log_path = tmp_path / "up.log"
    proc = up(tmp_path / "data", log_path, "--port", str(port))
    try:
        await up_ready(proc, f"http://127.0.0.1:{port}", log_path, timeout=90)
        server = nats_server_of(proc)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while server.is_running() and server.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, "nats-server outlived kill -9 of up"
        again = up(tmp_path / "data", log_path, "--port", str(port))  # the same data dir serves a new up
        try:
            await up_ready(again, f"http://127.0.0.1:{port}", log_path, timeout=90)
        finally:
            stop(again)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
