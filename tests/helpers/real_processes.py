"""The parts as real processes for the failure tests: `python -m imagegen worker|gateway`, each with
its log in a file, started, signalled and killed the way an operator (or the kernel) would; a whole
stack of a test module's own (`own_stack`); and the HTTP and NATS reads the tests check them with."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats
from nats.js.api import DeliverPolicy

from imagegen.embedded_nats import EmbeddedNats, free_port
from schemas import names
from schemas.codec import decode
from schemas.events import JobEvent

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Part:
    """One running process of the product, with its stderr in `log_path`."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def wait_for_log(self, needle: str, *, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if not self.alive:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} did not log {needle!r} within {timeout}s:\n{self.log()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.alive:
            self.process.send_signal(sig)

    async def wait_exit(self, *, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                return self.process.returncode
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} still running {timeout}s later:\n{self.log()[-3000:]}")

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait_exit(timeout=10)


@dataclass
class Parts:
    """Every process a test started; whatever is still running at the end is killed."""

    logs: Path
    started: list[Part] = field(default_factory=list)

    def spawn(self, name: str, args: list[str]) -> Part:
        log_path = self.logs / f"{name}-{len(self.started)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        part = Part(name=name, process=process, log_path=log_path)
        self.started.append(part)
        return part

    async def worker(self, nats_url: str, *flags: str, name: str = "worker") -> Part:
        part = self.spawn(
            name,
            [sys.executable, "-m", "imagegen", "worker", "--nats", nats_url, "--model", "simulated",
             "--worker-id", name, "--data-dir", str(self.logs / "data"), *flags],
        )
        await part.wait_for_log(" ready: model=simulated")
        return part

    async def gateway(self, nats_url: str, port: int, *flags: str, name: str = "gateway") -> Part:
        part = self.spawn(
            name, [sys.executable, "-m", "imagegen", "gateway", "--nats", nats_url, "--port", str(port), *flags]
        )
        await part.wait_for_log(f"gateway listening on http://127.0.0.1:{port}")
        return part

    def stop_all(self) -> None:
        for part in self.started:
            if part.alive:
                part.process.kill()
                part.process.wait(timeout=10)


@asynccontextmanager
async def own_stack(root: Path, *, name: str, worker_flags: tuple[str, ...] = (), gateway_flags: tuple[str, ...] = ()):
    """A nats-server, a simulated worker and a gateway, all of one test module's own, as real processes
    (so no other test's worker takes its jobs): yields (gateway URL, NATS URL, gateway, worker), and
    stops them all after."""
    broker = EmbeddedNats(store_dir=root / "nats", port=free_port()).start()
    parts = Parts(logs=root)
    try:
        worker = await parts.worker(broker.url, *worker_flags, name=f"{name}-worker")
        port = free_port()
        gateway = await parts.gateway(broker.url, port, *gateway_flags, name=f"{name}-gateway")
        yield f"http://127.0.0.1:{port}", broker.url, gateway, worker
    finally:
        parts.stop_all()
        broker.stop()


async def up_ready(proc: subprocess.Popen, url: str, log_path: Path, *, timeout: float = 120) -> None:
    """Waits until an `imagegen up` process answers /healthz with a worker ready; fails with its log
    when it exits or takes longer than `timeout`."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            try:
                async with http.get(f"{url}/healthz") as r:
                    if r.status == 200 and (await r.json())["workers"] >= 1:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("imagegen up did not become ready:\n" + log_path.read_text())


async def job_state(http: aiohttp.ClientSession, url: str, job_id: str) -> dict:
    async with http.get(f"{url}/v1/jobs/{job_id}", timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def wait_state(http: aiohttp.ClientSession, url: str, job_id: str, states: set[str], *, timeout: float = 30) -> dict:
    """Polls the native API until the job is in one of `states`."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = await job_state(http, url, job_id)
        if job["state"] in states:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} is {job.get('state')} after {timeout}s, wanted {sorted(states)}")


async def submit(http: aiohttp.ClientSession, url: str, body: dict) -> str:
    async with http.post(f"{url}/v1/jobs", json=body, timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 202, await r.text()
        return (await r.json())["job_id"]


async def stored_events(nats_url: str, job_id: str, *, quiet_s: float = 0.5) -> list[JobEvent]:
    """Every event the events stream kept for the job, in order, read straight from NATS."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(names.events_subject(job_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        events: list[JobEvent] = []
        for _ in range(10_000):
            try:
                msg = await sub.next_msg(timeout=quiet_s)
            except nats.errors.TimeoutError:
                break
            events.append(decode(msg.data, JobEvent))
        await sub.unsubscribe()
        return events
    finally:
        await nc.close()
