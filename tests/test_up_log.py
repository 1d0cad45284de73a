"""What `imagegen up` writes to its log, as a real process: by default its own lines only (start-up,
then one line per job event: queued, running, done), with no progress bars, library notices, request lines or
audit records; `--access-log` adds a line per HTTP request and `--audit-log` the audit records."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from imagegen.embedded_nats import free_port
from tests.helpers.real_processes import up_ready
from tests.helpers.service import wait_status

pytestmark = pytest.mark.processes  # each test starts imagegen up

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ ")


async def run_up(tmp_path: Path, *flags: str) -> tuple[str, str]:
    """Starts `imagegen up` in a fresh data dir, makes one image, polls its status a few times as a
    page does, stops it with SIGTERM; returns the job id and the whole log."""
    port = free_port()
    env = {**os.environ, "IMAGEGEN_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imagegen", "up", "--port", str(port), *flags], stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await up_ready(proc, url, log_path)
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "a secret lighthouse", "width": 64, "height": 64, "steps": 2}
            async with http.post(f"{url}/api/generate", json=body) as r:
                job_id = (await r.json())["task_id"]
            assert (await wait_status(http, url, job_id))["status"] == "done"
            for _ in range(5):
                async with http.get(f"{url}/v1/jobs/{job_id}") as r:
                    assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return job_id, log_path.read_text()


async def test_the_default_log_is_one_line_per_job_event(tmp_path):
    job_id, text = await run_up(tmp_path)
    lines = text.splitlines()
    assert all(LINE.match(line) for line in lines), text  # no bars, no library notices, no stray prints
    assert not [line for line in lines if "aiohttp.access" in line or "imagegen.audit" in line], text
    assert "secret lighthouse" not in text  # the prompt is in no line
    about_the_job = [line for line in lines if job_id in line]
    events = [re.search(r" (queued|running|done)\b", line) for line in about_the_job]
    said = [found.group(1) if found else line for found, line in zip(events, about_the_job)]
    # one line per event; the gateway logs `queued` once the broker has taken the job, by when an idle
    # worker in the same process may already have logged `running`
    assert sorted(said) == ["done", "queued", "running"] and said[-1] == "done", text
    assert not [line for line in lines if " WARNING " in line and "no CUDA device" not in line], text


@pytest.mark.parametrize("flags", [("--access-log", "--audit-log")])
async def test_access_and_audit_lines_come_with_their_flags(tmp_path, flags):
    job_id, text = await run_up(tmp_path, "--model", "simulated", *flags)
    polls = [line for line in text.splitlines() if f'"GET /v1/jobs/{job_id}" 200' in line]
    assert len(polls) == 5 and all("aiohttp.access" in line for line in polls), text
    [audit] = [line for line in text.splitlines() if "imagegen.audit" in line]
    assert job_id in audit and "secret lighthouse" in audit
