"""The event loop the gateway and worker processes run on (`--event-loop`, IMAGEGEN_EVENT_LOOP): uvloop
by default where it is installed, asyncio's own on request, and the whole job flow works on either."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import aiohttp
import pytest
from PIL import Image

from imagegen import event_loop
from tests.helpers.real_processes import own_stack

pytestmark = pytest.mark.processes  # each test starts imagegen or nats-server processes of its own


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_job_runs_end_to_end_on_either_event_loop(tmp_path, loop):
    flags = ("--event-loop", loop)
    async with own_stack(tmp_path, name=loop, worker_flags=flags, gateway_flags=flags) as (url, _, gateway, worker):
        await gateway.wait_for_log(f"event loop: {loop}")
        await worker.wait_for_log(f"event loop: {loop}")
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "format": "PNG"}
            headers = {"Prefer": "wait=60", "Accept": "image/png"}
            async with http.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=90)) as r:
                assert r.status == 201, await r.text()
                assert Image.open(io.BytesIO(await r.read())).size == (64, 64)


def test_uvloop_is_the_default_where_it_is_installed():
    assert event_loop.has_uvloop()  # a dependency on Linux and macOS
    assert event_loop.resolve("auto") == "uvloop"
    assert event_loop.resolve("asyncio") == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(event_loop, "has_uvloop", lambda: False)
    assert event_loop.resolve("auto") == "asyncio"
    with pytest.raises(event_loop.EventLoopUnavailable, match="uvloop is not installed"):
        event_loop.resolve("uvloop")
    with pytest.raises(ValueError, match="'trio' is none of auto, uvloop, asyncio"):
        event_loop.resolve("trio")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_unknown_event_loop_is_refused_at_start(how):
    args = [sys.executable, "-m", "imagegen", "gateway"]
    env = dict(os.environ)
    if how == "flag":
        args += ["--event-loop", "trio"]
    else:
        env["IMAGEGEN_EVENT_LOOP"] = "trio"
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert "--event-loop" in result.stderr and "trio" in result.stderr
