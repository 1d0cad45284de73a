"""Every example in README.md and docs/ runs as a user would paste it, against a live `imagegen up`.

Blocks fenced ```sh, ```bash or ```shell run with `bash -e -o pipefail`, and ```python blocks run as scripts,
each in an empty folder of its own. Other fences (```text, ```json, ```console) are output or synopses and are
not run, nor is a block right after a `<!-- not run: reason -->` comment. The stack is one `imagegen up`
process (tiny-sdxl on the CPU) on a nats-server of this module's own; the addresses users see,
http://127.0.0.1:4030 and nats://127.0.0.1:4222, are rewritten to the stack's, and the CLI finds it through
IMAGEGEN_URL / IMAGEGEN_NATS as a user's shell would set them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from imagegen.embedded_nats import EmbeddedNats, free_port

pytestmark = pytest.mark.processes  # each test starts imagegen or nats-server processes of its own

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL = {"sh", "bash", "shell"}
RUN = SHELL | {"python"}
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
USER_URL, USER_NATS = "http://127.0.0.1:4030", "nats://127.0.0.1:4222"
BLOCK_TIMEOUT_S = 120
MOST_NOT_RUN = 6  # install, `imagegen up`, the test suite, a GPU worker, a gateway with keys: keep it small
IMAGE_NAME = re.compile(r"\.(png|jpe?g|webp)$", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason given, when the block is marked not to run

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text().split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(opening["indent"]):])
            i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marked = NOT_RUN.match(before)
        found.append(Block(page, start + 1, opening["lang"], "\n".join(body) + "\n", marked["reason"] if marked else None))
        i += 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]
RUNNABLE = [block for block in ALL if block.lang in RUN and block.not_run is None]


def test_every_block_says_what_it_is_and_few_are_left_unrun():
    unlabelled = [block.name for block in ALL if not block.lang]
    assert not unlabelled, f"fence these with a language (sh, python, text, json, console): {unlabelled}"
    comments = [
        f"{page.relative_to(REPO)}:{n}" for page in PAGES for n, line in enumerate(page.read_text().split("\n"), 1)
        if line.strip().startswith("<!-- not run") and not NOT_RUN.match(line.strip())
    ]
    assert not comments, f"write these as <!-- not run: reason -->: {comments}"
    not_run = [f"{block.name} ({block.not_run})" for block in ALL if block.not_run]
    assert len(not_run) <= MOST_NOT_RUN, f"too many examples left unrun: {not_run}"
    assert len(RUNNABLE) >= 15, [block.name for block in RUNNABLE]


@dataclass(frozen=True)
class Stack:
    url: str
    nats_url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, data_dir) -> Stack:
    root = tmp_path_factory.mktemp("doc-stack")
    broker = EmbeddedNats(store_dir=root / "nats", port=free_port()).start()
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "IMAGEGEN_URL": f"http://127.0.0.1:{port}",
        "IMAGEGEN_NATS": broker.url,
    }
    log_path = root / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "imagegen", "up", "--nats", broker.url, "--port", str(port), "--model", "tiny-sdxl", "--controlnet", "canny=tiny-controlnet",
             "--data-dir", str(data_dir)],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while f"listening on http://127.0.0.1:{port}" not in log_path.read_text(errors="replace"):
            assert up.poll() is None, f"imagegen up exited with {up.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"imagegen up not listening after 180 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        while " ready: model=tiny-sdxl" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"no worker ready after 180 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        yield Stack(url=env["IMAGEGEN_URL"], nats_url=broker.url, env=env)
    finally:
        up.terminate()
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(timeout=10)
        broker.stop()


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_example_runs_as_written(block: Block, stack: Stack, tmp_path: Path):
    code = block.code.replace(USER_URL, stack.url).replace(USER_NATS, stack.nats_url)
    if block.lang in SHELL:
        script, command = tmp_path / "example.sh", ["bash", "-e", "-o", "pipefail"]
    else:
        script, command = tmp_path / "example.py", [sys.executable]
    work = tmp_path / "work"
    work.mkdir()
    script.write_text(code)
    try:
        done = subprocess.run([*command, str(script)], cwd=work, env=stack.env, capture_output=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.name} still running after {BLOCK_TIMEOUT_S} s:\n{block.code}\n{exc.stdout!r}\n{exc.stderr!r}")
    output = (done.stdout + done.stderr).decode(errors="replace")[-4000:]
    assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{block.code}\n{output}"
    images = [path for path in work.iterdir() if IMAGE_NAME.search(path.name)]
    for path in images:  # an error answer saved under an image's name is the classic broken example
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:
            pytest.fail(f"{block.name} left {path.name}, not an image ({exc}): {path.read_bytes()[:300]!r}\n{output}")
    if re.search(r"(-o \S+\.(png|jpe?g))|\.save\(|\"wb\"", block.code):
        assert images, f"{block.name} wrote no image:\n{output}"
