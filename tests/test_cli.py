"""The `imagegen` command as a user runs it: --help everywhere, and `imagegen up` end to end."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from PIL import Image

from imagegen.embedded_nats import free_port
from tests.helpers.real_processes import up_ready
from tests.helpers.service import wait_status

pytestmark = pytest.mark.processes  # each test starts imagegen or nats-server processes of its own


@pytest.mark.parametrize("command", [[], ["up"], ["gateway"], ["worker"], ["generate"]])
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "imagegen", *command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: imagegen" in result.stdout
    if command in (["up"], ["worker"]):
        assert "--model" in result.stdout and "IMAGEGEN_MODEL" in result.stdout
    if command in (["up"], ["gateway"]):
        assert "--port" in result.stdout and "--nats" in result.stdout


def test_the_fairness_of_the_tiers_is_a_whole_number_of_at_least_one():
    from imagegen.cli import build_parser, worker_settings

    assert worker_settings(build_parser().parse_args(["worker", "--fairness", "3"]), "nats://127.0.0.1:1").fairness == 3
    for bad in ("0", "two"):
        result = subprocess.run([sys.executable, "-m", "imagegen", "worker", "--fairness", bad], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "--fairness" in result.stderr, result.stderr
    env = {**os.environ, "IMAGEGEN_FAIRNESS": "0"}
    result = subprocess.run([sys.executable, "-m", "imagegen", "worker"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "--fairness" in result.stderr, result.stderr


async def test_up_serves_mflux_workflow_and_drains_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "IMAGEGEN_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imagegen", "up", "--port", str(port)], stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await up_ready(proc, url, log_path)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/ps") as r:
                assert (await r.json())["model"] == "tiny-sdxl"
            body = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": "42"}
            async with http.post(f"{url}/api/generate", json=body) as r:
                task_id = (await r.json())["task_id"]
            assert (await wait_status(http, url, task_id))["status"] == "done"
            async with http.get(f"{url}/api/image", params={"task_id": task_id, "base64": "false", "delete": "true"}) as r:
                assert Image.open(io.BytesIO(await r.read())).size == (64, 64)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "tiny-sdxl" in text and "no CUDA" in text
    assert (tmp_path / "nats").is_dir() and (tmp_path / "models" / "tiny-sdxl" / "model_index.json").exists()


def refused_in(log: str) -> bool:
    """A refused connection as asyncio's loop words it ("Connect call failed") or uvloop's (ConnectionRefusedError)."""
    return "Connect call failed" in log or "ConnectionRefusedError" in log


@pytest.mark.parametrize("part", ["gateway", "worker"])
def test_sigterm_while_nats_is_unreachable_at_start_exits_0(tmp_path, part):
    """A part still waiting for its broker stops on SIGTERM instead of holding on until NATS appears."""
    env = {**os.environ, "IMAGEGEN_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--nats", f"nats://127.0.0.1:{free_port()}"] + (["--port", "0"] if part == "gateway" else ["--model", "simulated"])
    log_path = tmp_path / "part.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imagegen", part, *args], stdout=log, stderr=log, env=env)
    try:
        deadline = time.monotonic() + 60
        while not refused_in(log_path.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        assert refused_in(log_path.read_text()), f"the {part} never tried its broker:\n{log_path.read_text()}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
