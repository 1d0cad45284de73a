"""Shared parts of the service benchmarks: the stack (an embedded nats-server, a gateway process, worker
processes with simulated engines), HTTP clients that follow a job to its image, percentiles, RSS
sampling, JSON results and markdown tables.

Run as a script it is one of the stack's processes:
  python bench/common.py gateway --nats URL             prints "READY <port>" once listening
  python bench/common.py workers --nats URL --count N   N workers as asyncio tasks in this process
  python bench/common.py tutorial                       one process, the engine behind an asyncio.Lock
  python bench/common.py load SPEC.json                 an aiohttp HTTP load generator (when wrk is missing)
Each runs until SIGTERM, on the event loop IMAGEGEN_EVENT_LOOP names (auto: uvloop where installed),
as `imagegen` does.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from imagegen import event_loop  # noqa: E402
from imagegen.embedded_nats import EmbeddedNats, free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FINAL_EVENTS = {"done", "failed", "cancelled", "expired"}
SMALL_JOB = {"prompt": "benchmark", "width": 64, "height": 64, "steps": 1}


# -- numbers --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the nearest ranks; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds of a list of durations in seconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3) if ms else float("nan"),
        "mean_ms": round(sum(ms) / len(ms), 3) if ms else float("nan"),
    }


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers of at least 1 ("1,8,32")."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 1")
    return values


def whole(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def number(*, above: float | None = None, least: float | None = None):
    """An argparse type: a finite number above `above` or at least `least`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be above {above:g}, got {text}")
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least:g}, got {text}")
        return value

    return parse


positive = number(above=0)  # durations, rates
non_negative = number(least=0)  # pauses that may be left out


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": event_loop.resolve(os.environ.get("IMAGEGEN_EVENT_LOOP", "auto")),  # the stack's processes'
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **data}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


# -- resident memory ------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class RssSampler:
    """Samples the RSS of some processes in a background task; keeps the peak of each."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.2):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.every_s = every_s
        self.peak: dict[str, float] = {name: 0.0 for name in pids}
        self._task: asyncio.Task | None = None

    def sample(self) -> dict[str, float]:
        now = {}
        for name, proc in self.procs.items():
            try:
                now[name] = proc.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                continue
            self.peak[name] = max(self.peak[name], now[name])
        return now

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sample()


class CpuMeter:
    """CPU seconds a process spent between start() and stop(), as a share of one core."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)

    def start(self) -> None:
        t = self.proc.cpu_times()
        self.cpu0, self.wall0 = t.user + t.system, time.monotonic()

    def stop(self) -> float:
        t = self.proc.cpu_times()
        return (t.user + t.system - self.cpu0) / max(1e-9, time.monotonic() - self.wall0)


def _tree_cpu() -> float:
    """CPU seconds of this process and every process under it (reaped ones included)."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


class OtherLoad:
    """Cores kept busy by processes outside this benchmark while it ran (the machine may be shared):
    a figure taken with other work around is a floor, not the service's ceiling."""

    def __enter__(self) -> "OtherLoad":
        self.wall0, self.busy0, self.ours0 = time.monotonic(), _machine_busy(), _tree_cpu()
        self.cores = 0.0
        return self

    def __exit__(self, *exc) -> None:
        wall = max(1e-9, time.monotonic() - self.wall0)
        other = (_machine_busy() - self.busy0) - (_tree_cpu() - self.ours0)
        self.cores = round(max(0.0, other / wall), 2)


# -- the stack ------------------------------------------------------------------------------------


@dataclass
class Role:
    """One process of the stack, started from this file."""

    name: str
    proc: asyncio.subprocess.Process
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a drain), then SIGKILL after `timeout`; timeout 0 kills at once."""
        if self.proc.returncode is not None:
            return
        if timeout <= 0:
            self.proc.kill()
            await self.proc.wait()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def start_role(name: str, args: list[str], *, log_path: Path, timeout: float = 120.0) -> Role:
    """Starts `python bench/common.py <args>` and waits for its READY line."""
    log_file = open(log_path, "ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), *args,
        stdout=asyncio.subprocess.PIPE, stderr=log_file, cwd=str(ROOT),
    )
    log_file.close()
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        raise RuntimeError(f"{name} did not start within {timeout}s; see {log_path}") from None
    text = line.decode().strip()
    if not text.startswith("READY"):
        await proc.wait()
        raise RuntimeError(f"{name} exited before it was ready ({proc.returncode}); see {log_path}")
    parts = text.split()
    return Role(name=name, proc=proc, port=int(parts[1]) if len(parts) > 1 else None)


@dataclass
class Stack:
    """An embedded nats-server in a temporary folder, and the processes started against it."""

    workdir: Path
    nats: EmbeddedNats
    roles: list[Role] = field(default_factory=list)
    gateway: Role | None = None
    workers: list[Role] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return f"http://127.0.0.1:{self.gateway.port}"

    async def start_gateway(self, *, private_webhooks: bool = False, name: str = "gateway") -> Role:
        """A gateway process; `private_webhooks`: it may call webhooks on loopback. The first one
        started is `self.gateway`."""
        extra = ["--webhook-allow-private"] if private_webhooks else []
        role = await start_role(name, ["gateway", "--nats", self.nats.url, *extra], log_path=self.workdir / f"{name}.log")
        self.gateway = self.gateway or role
        self.roles.append(role)
        return role

    async def start_workers(
        self, count: int, *, fixed_s: float = 0.0, step_s: float = 0.0, per_process: int = 32
    ) -> list[Role]:
        """`count` simulated workers as asyncio tasks, at most `per_process` to a process; the
        processes start side by side."""
        sizes = [min(per_process, count - i) for i in range(0, count, per_process)]
        first = len(self.workers)
        started = await asyncio.gather(*(
            start_role(
                f"workers-{first + k}",
                ["workers", "--nats", self.nats.url, "--count", str(n), "--fixed-s", str(fixed_s), "--step-s", str(step_s)],
                log_path=self.workdir / f"workers-{first + k}.log",
            )
            for k, n in enumerate(sizes)
        ))
        self.workers += started
        self.roles += started
        return list(started)

    async def stop_workers(self, timeout: float = 30.0) -> None:
        await asyncio.gather(*(w.stop(timeout) for w in self.workers))
        self.roles = [r for r in self.roles if r not in self.workers]
        self.workers = []

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop(10.0) for r in self.roles))
        await self.nats.astop()

    def pids(self) -> dict[str, int]:
        found = {r.name: r.pid for r in self.roles}
        if self.nats.process is not None:
            found["nats-server"] = self.nats.process.pid
        return found


async def open_stack(stack: AsyncExitStack, *, gateway: bool = True) -> Stack:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imagegen-bench-")))
    nats = EmbeddedNats(store_dir=workdir / "nats", port=free_port())
    await asyncio.get_running_loop().run_in_executor(None, nats.start)
    s = Stack(workdir=workdir, nats=nats)
    stack.push_async_callback(s.stop)
    if gateway:
        await s.start_gateway()
    return s


# -- clients ------------------------------------------------------------------------------------


class JobError(RuntimeError):
    pass


JOB_ERRORS = (JobError, aiohttp.ClientError, asyncio.TimeoutError)  # what a client run counts and goes on from


async def submit(http: aiohttp.ClientSession, url: str, body: dict) -> str:
    async with http.post(f"{url}/v1/jobs", json=body) as r:
        if r.status != 202:
            raise JobError(f"submit answered {r.status}: {await r.text()}")
        return (await r.json())["job_id"]


async def submit_and_wait(http: aiohttp.ClientSession, url: str, body: dict, timeout: float = 60.0) -> dict:
    """Submits with `Prefer: wait`: answered once the job has ended (201), or as it is after `timeout`."""
    async with http.post(f"{url}/v1/jobs", json=body, headers={"Prefer": f"wait={timeout:g}"}) as r:
        if r.status not in (201, 202):
            raise JobError(f"submit answered {r.status}: {await r.text()}")
        return await r.json()


async def submit_for_image(http: aiohttp.ClientSession, url: str, body: dict, timeout: float = 60.0) -> bytes:
    """Submits with `Prefer: wait` and `Accept: image/*`: the answer is the finished image itself."""
    headers = {"Prefer": f"wait={timeout:g}", "Accept": "image/*"}
    async with http.post(f"{url}/v1/jobs", json=body, headers=headers) as r:
        data = await r.read()
        if r.status != 201 or not r.content_type.startswith("image/"):
            raise JobError(f"submit for the image answered {r.status} {r.content_type}: {data[:200]!r}")
        return data


async def wait_ws(http: aiohttp.ClientSession, url: str, job_id: str, timeout: float = 60.0, seen: dict | None = None) -> dict:
    """Follows the job on /v1/jobs/{id}/ws until its final event; `seen` gets each event type's
    (stamp, wall-clock time received)."""
    async with http.ws_connect(f"{url}/v1/jobs/{job_id}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
        return await final_event(ws, job_id, timeout=timeout, seen=seen)


async def wait_socket(ws: aiohttp.ClientWebSocketResponse, job_id: str, timeout: float = 60.0, seen: dict | None = None) -> dict:
    """Follows the job on a socket the client keeps open for all its jobs (/v1/ws, as the web UI does):
    {"follow": [id]}, then its events until the final one."""
    await ws.send_str(json.dumps({"follow": [job_id]}))
    return await final_event(ws, job_id, timeout=timeout, seen=seen)


async def final_event(ws: aiohttp.ClientWebSocketResponse, job_id: str, *, timeout: float, seen: dict | None) -> dict:
    """Reads the socket until the job's final event (other jobs' events are passed over)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise JobError(f"job {job_id}: socket closed before the final event ({msg.type})")
        event = json.loads(msg.data)
        if event.get("job_id", job_id) != job_id:
            continue
        if seen is not None:
            seen.setdefault(event.get("type"), (event.get("ts", 0.0), time.time()))
        if event.get("type") in FINAL_EVENTS:
            return event
        if event.get("type") == "error":
            raise JobError(f"job {job_id}: {event}")


async def wait_poll(http: aiohttp.ClientSession, url: str, job_id: str, timeout: float = 60.0) -> dict:
    """Polls GET /v1/jobs/{id} back to back until the state is final."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(f"{url}/v1/jobs/{job_id}") as r:
            body = await r.json()
        if body["state"] in FINAL_EVENTS:
            return body
    raise JobError(f"job {job_id} not final after {timeout}s")


async def fetch_image(http: aiohttp.ClientSession, url: str, job_id: str) -> bytes:
    async with http.get(f"{url}/v1/jobs/{job_id}/image") as r:
        data = await r.read()
        if r.status != 200:
            raise JobError(f"image of {job_id} answered {r.status}: {data[:200]!r}")
        return data


async def run_job(
    http: aiohttp.ClientSession, url: str, body: dict, *, wait: str = "ws", socket: aiohttp.ClientWebSocketResponse | None = None
) -> dict[str, float]:
    """Submit, wait for done, fetch the image; the seconds each part took. `wait`: "ws" (the job's own
    WebSocket), "socket" (`socket`, one WebSocket kept open for every job), "poll" (GET back to back)
    "prefer" (the submit itself waits) or "image" (the submit waits and its answer is the image, no
    fetch after it). Waiting on a WebSocket also splits the wait by the events'
    stamps: `pickup` (queued -> started: a worker takes the job and marks it running), `run` (started
    -> done: engine, encoding, object store, status) and `notify` (done stamped by the worker ->
    received by the client)."""
    seen: dict = {}
    t0 = time.perf_counter()
    if wait == "image":  # one request, the image in its answer
        await submit_for_image(http, url, body)
        t1 = time.perf_counter()
        return {"total": t1 - t0, "submit": t1 - t0, "wait": 0.0, "image": 0.0}
    if wait == "prefer":  # one request: the submit is answered when the job has ended
        final = await submit_and_wait(http, url, body)
        if final["state"] != "done":
            raise JobError(f"job {final['job_id']} ended {final['state']}")
        t1 = t2 = time.perf_counter()
        await fetch_image(http, url, final["job_id"])
        t3 = time.perf_counter()
        return {"total": t3 - t0, "submit": t1 - t0, "wait": 0.0, "image": t3 - t2}
    job_id = await submit(http, url, body)
    t1 = time.perf_counter()
    if wait == "ws":
        final = await wait_ws(http, url, job_id, seen=seen)
    elif wait == "socket":
        final = await wait_socket(socket, job_id, seen=seen)
    else:
        final = await wait_poll(http, url, job_id)
    if final.get("type", final.get("state")) != "done":
        raise JobError(f"job {job_id} ended {final}")
    t2 = time.perf_counter()
    await fetch_image(http, url, job_id)
    t3 = time.perf_counter()
    parts = {"total": t3 - t0, "submit": t1 - t0, "wait": t2 - t1, "image": t3 - t2}
    if {"queued", "started", "done"} <= seen.keys():
        parts["pickup"] = seen["started"][0] - seen["queued"][0]
        parts["run"] = seen["done"][0] - seen["started"][0]
        parts["notify"] = seen["done"][1] - seen["done"][0]
    return parts


def http_session(limit: int = 1000, timeout_s: float = 30.0) -> aiohttp.ClientSession:
    """A client session whose every request gives up after `timeout_s`, so no run can hang."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


# -- HTTP load generators -------------------------------------------------------------------------


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _wrk_ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group(0))
    unit = text[len(re.match(r"[\d.]+", text).group(0)):]
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[unit]


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk_script(*, method: str, paths: list[str], body: str | None) -> str:
    """A wrk script that sends `method` to the paths in turn (each connection its own turn)."""
    listed = ",\n".join(_lua_string(p) for p in paths)
    lines = [f"local paths = {{{listed}}}", "local i = math.random(#paths)"]
    if body is not None:
        lines += ['wrk.headers["Content-Type"] = "application/json"', f"local body = {_lua_string(body)}"]
    else:
        lines += ["local body = nil"]
    lines += [
        "request = function()",
        "  i = i % #paths + 1",
        f'  return wrk.format("{method}", paths[i], nil, body)',
        "end",
    ]
    return "\n".join(lines) + "\n"


async def run_wrk(
    base_url: str, *, paths: list[str], method: str = "GET", body: str | None = None,
    connections: int = 64, duration_s: float = 10.0, cpu: int | None = None, workdir: Path,
) -> dict[str, Any]:
    """Runs wrk (one thread) against base_url; requests/s, latency percentiles, failures."""
    script = workdir / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text(wrk_script(method=method, paths=paths, body=body))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{int(duration_s)}s", "--latency", "-s", str(script), base_url]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or rps is None:
        raise RuntimeError(f"wrk failed: {out[-500:]}")
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "client": "wrk",
        "connections": connections,
        "duration_s": duration_s,
        "requests": int(total.group(1)) if total else None,
        "requests_per_s": round(float(rps.group(1)), 1),
        "p50_ms": round(_wrk_ms(lat["50"]), 3) if "50" in lat else None,
        "p90_ms": round(_wrk_ms(lat["90"]), 3) if "90" in lat else None,
        "p99_ms": round(_wrk_ms(lat["99"]), 3) if "99" in lat else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


async def run_python_load(
    base_url: str, *, paths: list[str], method: str = "GET", body: str | None = None,
    connections: int = 64, duration_s: float = 10.0, cpu: int | None = None, workdir: Path,
) -> dict[str, Any]:
    """The same measure as run_wrk with an aiohttp client in another process (when wrk is missing)."""
    spec = workdir / f"load-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps({"base_url": base_url, "paths": paths, "method": method, "body": body, "connections": connections, "duration_s": duration_s}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "load", str(spec)]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out = (await proc.communicate())[0].decode()
    return json.loads(out.strip().splitlines()[-1])


async def http_load(base_url: str, **kw) -> dict[str, Any]:
    return await (run_wrk if wrk_available() else run_python_load)(base_url, **kw)


async def serve_load(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    paths, method, body = spec["paths"], spec["method"], spec["body"]
    data = body.encode() if body is not None else None
    lat: list[float] = []
    failures = 0
    deadline = time.perf_counter() + spec["duration_s"]

    async def client(http: aiohttp.ClientSession, k: int) -> None:
        nonlocal failures
        i = k
        while time.perf_counter() < deadline:
            i = (i + 1) % len(paths)
            t0 = time.perf_counter()
            async with http.request(method, spec["base_url"] + paths[i], data=data, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status >= 400:
                    failures += 1
            lat.append(time.perf_counter() - t0)

    started = time.perf_counter()
    async with http_session(spec["connections"]) as http:
        await asyncio.gather(*(client(http, k) for k in range(spec["connections"])))
    elapsed = time.perf_counter() - started
    s = summary_ms(lat)
    print(json.dumps({
        "client": "python-aiohttp", "connections": spec["connections"], "duration_s": spec["duration_s"],
        "requests": len(lat), "requests_per_s": round(len(lat) / elapsed, 1), "p50_ms": s["p50_ms"],
        "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"], "non_2xx": failures, "socket_errors": 0,
    }))


# -- the processes ------------------------------------------------------------------------------


def _ready(port: int | None = None) -> None:
    sys.stdout.write(f"READY {port}\n" if port is not None else "READY\n")
    sys.stdout.flush()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_gateway(args: argparse.Namespace) -> None:
    from gateway.settings import GatewaySettings
    from imagegen import runtime

    stop = _stop_event()
    running = await runtime.start_gateway(
        GatewaySettings(nats_url=args.nats, port=args.port, webhook_allow_private=args.webhook_allow_private)
    )
    _ready(running.port)
    await stop.wait()
    await running.stop()


async def serve_workers(args: argparse.Namespace) -> None:
    from gpu_worker.settings import WorkerSettings
    from imagegen import runtime

    stop = _stop_event()
    settings = [
        WorkerSettings(
            nats_url=args.nats,
            worker_id=f"bench-{os.getpid()}-{i}",
            model="simulated",
            sim_step_s=args.step_s,
            sim_fixed_s=args.fixed_s,
        )
        for i in range(args.count)
    ]
    started: list[tuple[Any, asyncio.Task]] = []
    for batch in range(0, len(settings), 8):
        started += await asyncio.gather(*(runtime.start_worker(s, warm_up=False) for s in settings[batch : batch + 8]))
    _ready()
    await stop.wait()
    for worker, _ in started:
        worker.stop()
    await asyncio.gather(*(task for _, task in started), return_exceptions=True)
    await asyncio.gather(*(worker.close() for worker, _ in started), return_exceptions=True)


async def serve_tutorial(args: argparse.Namespace) -> None:
    """The single-process design: an HTTP handler that holds an asyncio.Lock around the engine and
    answers with the image (aiohttp here; FastAPI in the tutorial)."""
    from aiohttp import web

    from gpu_worker.engines.base import GenerationTask
    from gpu_worker.engines.simulated import SimulatedEngine

    engine = SimulatedEngine(step_s=args.step_s, fixed_s=args.fixed_s)
    lock = asyncio.Lock()

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        task = GenerationTask(
            job_id="tutorial", prompt=body["prompt"], negative_prompt="", width=body["width"], height=body["height"],
            steps=body["steps"], guidance=5.0, seed=body.get("seed", 0),
        )
        data = await generate_locked(engine, lock, task)
        return web.Response(body=data, content_type="image/jpeg")

    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    stop = _stop_event()
    _ready(site._server.sockets[0].getsockname()[1])
    await stop.wait()
    await runner.cleanup()


async def generate_locked(engine, lock: asyncio.Lock, task) -> bytes:
    """The engine run and the JPEG encoding, one at a time, off the event loop (as the worker does)."""
    loop = asyncio.get_running_loop()

    def encode(image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    async with lock:
        image = await loop.run_in_executor(None, engine.generate, task, lambda *_: None)
        return await loop.run_in_executor(None, encode, image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    gw = sub.add_parser("gateway")
    gw.add_argument("--nats", required=True)
    gw.add_argument("--port", type=int, default=0)
    gw.add_argument("--webhook-allow-private", action="store_true")
    wk = sub.add_parser("workers")
    wk.add_argument("--nats", required=True)
    wk.add_argument("--count", type=int, default=1)
    wk.add_argument("--fixed-s", type=float, default=0.0)
    wk.add_argument("--step-s", type=float, default=0.0)
    ld = sub.add_parser("load")
    ld.add_argument("spec")
    tu = sub.add_parser("tutorial")
    tu.add_argument("--port", type=int, default=0)
    tu.add_argument("--fixed-s", type=float, default=0.0)
    tu.add_argument("--step-s", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    role = {"gateway": serve_gateway, "workers": serve_workers, "tutorial": serve_tutorial, "load": serve_load}[args.role]
    event_loop.run(role(args), loop=os.environ.get("IMAGEGEN_EVENT_LOOP", "auto"))  # the loop `imagegen` runs on


if __name__ == "__main__":
    main()
