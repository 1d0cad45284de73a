"""What a newcomer types wrong, as real `imagegen` processes: each mistake is one clear line on stderr
and exit status 2, never a traceback; and what they type right but loosely (an address without
http://) works."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from imagegen.embedded_nats import free_port

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


async def imagegen(*args: str, cwd: Path | None = None, timeout: float = 60, env: dict | None = None) -> tuple[int, str]:
    """Runs `python -m imagegen ARGS` without blocking the test's event loop (the gateway it calls may
    be served by that loop); returns the exit status and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegen", *args, cwd=cwd, env={**ENV, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, err.decode()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


async def test_an_address_without_http_reaches_the_gateway(service, tmp_path):
    address = service.url.removeprefix("http://")
    status, err = await imagegen(
        "generate", "a lighthouse", "--url", address, "--width", "64", "--height", "72", "--steps", "2",
        "--seed", "-1", "--guidance", "3", "--scheduler", "euler_a", "--format", "jpeg", cwd=tmp_path,
    )
    assert status == 0, err
    with Image.open(tmp_path / "out.jpg") as image:  # --format picks the default file's extension
        assert image.format == "JPEG" and image.size == (64, 72)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--url", "127.0.0.1:{dead}"], ["cannot reach the gateway at http://127.0.0.1:{dead}", "nothing listens", "imagegen up"]),
        (["--url", "{url}/api"], ["no imagegen gateway at {url}/api", "without /api"]),
        (["--url", "ftp://127.0.0.1:4030"], ["--url", "http://"]),
        (["--url", "http://[::1"], ["--url", "not a URL"]),
        (["--wdth", "64"], ["imagegen generate: error", "--wdth", "did you mean --width?"]),
        (["--width", "4096", "--height", "4096"], ["4096x4096", "width x height", "2048x2048"]),
        (["--width", "100"], ["width", "multiple of 8"]),
        (["-o", "out.gif"], ["-o out.gif", ".png"]),
        (["-o", "out.png", "--format", "webp"], ["-o out.png", "--format"]),
    ],
    ids=["no-server", "api-path", "ftp", "bad-url", "typo", "pixel-budget", "not-multiple-of-8", "extension", "format-clash"],
)
async def test_a_mistake_is_one_line_and_exit_status_2(service, tmp_path, args, words):
    fill = {"url": service.url, "dead": str(free_port())}
    if "--url" not in args:
        args = [*args, "--url", service.url]
    status, err = await imagegen("generate", "a lighthouse", *[a.format(**fill) for a in args], cwd=tmp_path)
    line = one_line(err)
    assert status == 2, err
    for word in words:
        assert word.format(**fill) in line, line
    assert not list(tmp_path.iterdir())  # nothing written


async def test_a_typo_in_up_names_up_and_the_flag_meant(tmp_path):
    status, err = await imagegen("up", "--prot", "4031", cwd=tmp_path)
    assert status == 2
    line = one_line(err)
    assert line.startswith("imagegen up: error:") and "did you mean --port?" in line, line


@pytest.mark.parametrize("command", ["up", "gateway"])
async def test_a_second_up_on_a_busy_port_says_which_flag_before_starting_anything(service, tmp_path, command):
    busy = service.url.rsplit(":", 1)[1]  # a live gateway's port, as a first `imagegen up` holds 4030
    status, err = await imagegen(command, "--port", busy, cwd=tmp_path, timeout=30, env={"IMAGEGEN_DATA_DIR": str(tmp_path / "data")})
    line = one_line(err)
    assert status == 2
    assert f"imagegen {command}: error: port {busy} on 127.0.0.1 is in use" in line and "pass --port" in line, line
    assert not (tmp_path / "data").exists()  # no server store, no model built: nothing was started


async def test_up_help_is_grouped_with_defaults_and_variables(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegen", "up", "--help", env={**ENV, "COLUMNS": "200"}, stdout=asyncio.subprocess.PIPE
    )
    text = (await proc.communicate())[0].decode()
    assert proc.returncode == 0
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles == ["options", "network", "limits", "engine", "safety", "operations", "testing"], titles
    sections = dict(zip(titles, re.split(r"^\w[\w ]*:$", text, flags=re.M)[1:]))
    assert re.search(r"--port PORT +gateway port \(default: 4030; IMAGEGEN_PORT\)", sections["network"])
    assert "(default: 100; IMAGEGEN_MAX_STEPS)" in sections["limits"]
    assert "--sim-step-s" in sections["testing"] and "--sim-fail-marker" in sections["testing"]
    assert "--sim-" not in text.split("\ntesting:")[0]
    for flag in ("--access-log", "--audit-log"):
        assert flag in sections["operations"]


async def test_generate_help_explains_each_flag(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegen", "generate", "--help", env={**ENV, "COLUMNS": "200"}, stdout=asyncio.subprocess.PIPE
    )
    text = (await proc.communicate())[0].decode()
    for flag, words in (("--width WIDTH", "multiple of 8"), ("--height HEIGHT", "multiple of 8"), ("--steps STEPS", "denoising steps"),
                        ("--seed SEED", "-1"), ("--guidance GUIDANCE", "guidance"), ("--scheduler NAME", "euler_a"),
                        ("--format {PNG,JPEG,WEBP}", "png")):
        [line] = [line for line in text.splitlines() if line.strip().startswith(flag)]
        assert words in line, line
