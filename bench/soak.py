"""Soak: thousands of jobs through real processes while workers are SIGKILLed and the broker restarts.

A nats-server with file storage, a gateway process and worker processes (`imagegen worker --model
simulated`, a few milliseconds a step, a short ack wait so that a killed worker's job comes back
quickly). Jobs go in over HTTP at a steady rate, each with its own Idempotency-Key (a submit that got
503 or no answer while the broker was away is sent again with the same key, so nothing is doubled).
Meanwhile workers that hold a job are SIGKILLed at random moments and started again, and the broker
is SIGKILLed once and started again on the same port and store.

Then every job is checked from the broker itself: its status record (KV), its image (object store),
its events (stream IMAGEGEN_EVENTS), and the workers' logs. lost = never final; duplicates = a job
with more than one `done` event, or whose stored image or `done` event names other chunks than its
record (a second image written over the first), or a job the client never asked for; a done job
without its image or its `done` event, and a job that ended otherwise (failed), fail the run too;
runs are counted from the workers' logs (a `started` event can be lost with the broker); redeliveries
= tries past the first (the status's attempt number). The exit code is 1 when any check failed.

  python bench/soak.py                      # 2,000 jobs, 4 workers, 8 kills, 1 broker restart
  python bench/soak.py --jobs 300 --kills 3 # a shorter run

Writes bench/results/soak.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import aiohttp  # noqa: E402
import msgpack  # noqa: E402
import nats  # noqa: E402
from nats.js.api import DeliverPolicy  # noqa: E402
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError  # noqa: E402

from common import RESULTS, OtherLoad, machine, markdown_table, non_negative, percentile, positive, whole  # noqa: E402
from imagegen.embedded_nats import EmbeddedNats, free_port  # noqa: E402
from schemas import names  # noqa: E402
from schemas.codec import decode  # noqa: E402
from schemas.status import JobStatus  # noqa: E402

RETRY_STATUSES = {502, 503, 504}


@dataclass(frozen=True, kw_only=True)
class SoakSettings:
    jobs: int = 2000
    workers: int = 4
    rate: float = 50.0  # submissions per second, open loop: below what 4 workers and one gateway do on 2 cores
    kills: int = 8  # SIGKILLs of busy workers, each started again at once
    broker_outage_s: float = 2.0  # how long the broker stays down on its one restart
    steps: int = 4
    step_s: float = 0.01  # simulated engine: seconds per step
    ack_wait_s: float = 2.0  # a killed worker's job is redelivered after this
    max_deliver: int = 5
    submit_deadline_s: float = 60.0  # per job, retries included
    drain_timeout_s: float = 120.0  # after the last submit, for every job to become final
    seed: int = 1
    workdir: str | None = None  # kept when given (logs, the broker's store); else a temporary folder


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One process of the product, its output in a log file."""

    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_for_log(self, needle: str, *, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not log {needle!r} within {timeout}s; see {self.log_path}")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        for _ in range(200):
            if not self.alive:
                return
            await asyncio.sleep(0.05)


def spawn(workdir: Path, name: str, args: list[str], started: list[Proc]) -> Proc:
    """`python -m imagegen ARGS` with its output in `workdir/NAME.log`, noted in `started`."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "imagegen", *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    proc = Proc(name=name, process=process, log_path=log_path)
    started.append(proc)
    return proc


async def start_simulated_worker(workdir: Path, name: str, step_s: float, flags: list[str], started: list[Proc]) -> Proc:
    """`imagegen worker` on the simulated engine (`step_s` a step, no previews), ready to take jobs."""
    proc = spawn(workdir, name, [
        "worker", "--model", "simulated", "--worker-id", name, "--sim-step-s", str(step_s),
        "--preview-every", "0", "--data-dir", str(workdir / "data"), *flags,
    ], started)
    await proc.wait_for_log(" ready: model=simulated")
    return proc


def kill_all(started: list[Proc]) -> None:
    for proc in started:
        if proc.alive:
            proc.process.kill()
            proc.process.wait(timeout=10)


@dataclass
class Stack:
    settings: SoakSettings
    workdir: Path
    broker: EmbeddedNats
    gateway: Proc | None = None
    workers: dict[int, Proc] = field(default_factory=dict)
    started: list[Proc] = field(default_factory=list)

    def topology_flags(self) -> list[str]:
        return ["--ack-wait", str(self.settings.ack_wait_s), "--max-deliver", str(self.settings.max_deliver)]

    def spawn(self, name: str, args: list[str]) -> Proc:
        return spawn(self.workdir, name, args, self.started)

    async def start_gateway(self) -> str:
        port = free_port()
        self.gateway = self.spawn("gateway", ["gateway", "--nats", self.broker.url, "--port", str(port), *self.topology_flags()])
        await self.gateway.wait_for_log(f"gateway listening on http://127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"

    async def start_worker(self, slot: int, generation: int) -> Proc:
        flags = ["--nats", self.broker.url, *self.topology_flags()]
        proc = self.workers[slot] = await start_simulated_worker(
            self.workdir, f"soak-w{slot}-{generation}", self.settings.step_s, flags, self.started
        )
        return proc

    def stop_all(self) -> None:
        kill_all(self.started)
        self.broker.stop()


# -- the client side ------------------------------------------------------------------------------


@dataclass
class Submitted:
    n: int
    key: str
    submitted_at: float  # wall clock of the first try
    job_id: str | None = None
    tries: int = 0
    error: str | None = None


async def submit_one(http: aiohttp.ClientSession, url: str, job: Submitted, body: dict, deadline_s: float) -> None:
    """POSTs until the gateway takes the job; 5xx or no answer: the same request, the same key, again."""
    deadline = time.monotonic() + deadline_s
    pause = 0.1
    while True:
        job.tries += 1
        try:
            async with http.post(
                f"{url}/v1/jobs", json=body, headers={"Idempotency-Key": job.key}, timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                if r.status == 202:
                    job.job_id = (await r.json())["job_id"]
                    return
                text = await r.text()
                if r.status not in RETRY_STATUSES:
                    job.error = f"HTTP {r.status}: {text[:200]}"
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        if time.monotonic() + pause > deadline:
            job.error = f"not taken after {job.tries} tries in {deadline_s:.0f}s"
            return
        await asyncio.sleep(pause)
        pause = min(1.0, pause * 2)


class BusyWorkers:
    """Which worker holds which job, from the live `started` and final events."""

    def __init__(self) -> None:
        self.holding: dict[str, str] = {}

    async def on_event(self, msg) -> None:
        try:
            event = msgpack.unpackb(msg.data)
        except Exception:
            return
        kind, worker = event.get("type"), event.get("worker")
        if kind == "started" and worker:
            self.holding[worker] = event.get("job_id", "")
        elif kind in ("done", "failed", "cancelled", "expired"):
            for name, job_id in list(self.holding.items()):
                if job_id == event.get("job_id"):
                    del self.holding[name]


@dataclass
class Chaos:
    kills: list[dict] = field(default_factory=list)
    broker_restarts: list[dict] = field(default_factory=list)


async def make_chaos(stack: Stack, busy: BusyWorkers, window_s: float, rng: random.Random, chaos: Chaos, t0: float) -> None:
    """SIGKILLs of busy workers at random moments of the submit window, and one broker restart mid-way."""
    settings = stack.settings
    moments = sorted(rng.uniform(0.05, 0.9) * window_s for _ in range(settings.kills))
    plan = [(m, "kill") for m in moments] + [(0.5 * window_s, "broker")]
    generation = settings.workers
    for at, what in sorted(plan):
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        if what == "broker":
            url = stack.broker.url
            stack.broker.process.kill()
            stack.broker.process.wait(timeout=10)
            down_at = time.monotonic()
            await asyncio.sleep(settings.broker_outage_s)
            await asyncio.get_running_loop().run_in_executor(None, stack.broker.start)
            if stack.broker.url != url:
                raise RuntimeError(f"the broker came back on {stack.broker.url}, not {url}")
            chaos.broker_restarts.append({"at_s": round(down_at - t0, 2), "down_s": round(time.monotonic() - down_at, 2)})
            continue
        holding = {name: job for name, job in busy.holding.items() if any(p.name == name and p.alive for p in stack.workers.values())}
        slots = [slot for slot, proc in stack.workers.items() if proc.name in holding] or list(stack.workers)
        slot = rng.choice(slots)
        victim = stack.workers[slot]
        job_id = holding.get(victim.name)
        await victim.kill()
        killed_at = time.monotonic()
        busy.holding.pop(victim.name, None)
        generation += 1
        await stack.start_worker(slot, generation)
        chaos.kills.append({
            "at_s": round(killed_at - t0, 2), "worker": victim.name, "job_in_hand": job_id,
            "replacement_ready_s": round(time.monotonic() - killed_at, 2),
        })


# -- checking what the broker holds ---------------------------------------------------------------


async def read_statuses(js, job_ids: list[str]) -> dict[str, JobStatus | None]:
    kv = await js.key_value(names.STATUS_BUCKET)
    found: dict[str, JobStatus | None] = {}
    gate = asyncio.Semaphore(32)

    async def one(job_id: str) -> None:
        async with gate:
            try:
                entry = await kv.get(job_id)
                found[job_id] = decode(entry.value, JobStatus) if entry.value else None
            except KeyNotFoundError:
                found[job_id] = None

    await asyncio.gather(*(one(j) for j in job_ids))
    return found


async def wait_final(js, job_ids: list[str], timeout_s: float) -> dict[str, JobStatus | None]:
    """Status records, re-read until every job is final or the time is up."""
    statuses: dict[str, JobStatus | None] = {}
    open_ids = list(job_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            statuses.update(await read_statuses(js, open_ids))
        except Exception:  # the broker answers slowly right after its restart: read again
            pass
        open_ids = [j for j in open_ids if statuses.get(j) is None or not statuses[j].state.final]
        if not open_ids or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.5)


async def image_descriptions(js, job_ids: list[str]) -> dict[str, tuple[str, int]]:
    """Per job with a stored image: (the nuid naming its chunks, its size), from its description."""
    obs = await js.object_store(names.IMAGES_BUCKET)
    found: dict[str, tuple[str, int]] = {}
    gate = asyncio.Semaphore(32)

    async def one(job_id: str) -> None:
        async with gate:
            try:
                info = await obs.get_info(job_id)
            except NotFoundError:
                return
            found[job_id] = (info.nuid, info.size)

    await asyncio.gather(*(one(j) for j in job_ids))
    return found


async def stored_events(js, *, quiet_s: float = 2.0) -> tuple[dict[str, list[str | None]], Counter]:
    """From stream IMAGEGEN_EVENTS: per job, the image (chunks nuid) each `done` event names, and the
    `started` events per job."""
    total = (await js.stream_info(names.EVENTS_STREAM)).state.messages
    sub = await js.subscribe(f"{names.EVENTS_SUBJECT_PREFIX}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    done: dict[str, list[str | None]] = {}
    started = Counter()
    try:
        for _ in range(total):
            try:
                msg = await sub.next_msg(timeout=quiet_s)
            except nats.errors.TimeoutError:
                break
            event = msgpack.unpackb(msg.data)
            if event.get("type") == "done":
                done.setdefault(event.get("job_id"), []).append((event.get("image") or {}).get("chunks_id"))
            elif event.get("type") == "started":
                started[event.get("job_id")] += 1
    finally:
        await sub.unsubscribe()
    return done, started


async def chunk_sets(js) -> set[str]:
    """The nuids of the chunk sets the image stream holds: one per image stored and not purged."""
    prefix = f"$O.{names.IMAGES_BUCKET}.C."
    info = await js.stream_info(f"OBJ_{names.IMAGES_BUCKET}", subjects_filter=f"{prefix}>")
    return {subject.removeprefix(prefix) for subject in (info.state.subjects or {})}


RUN_LINE = re.compile(r"job (\S+) try (\d+) running")


def runs_logged(logs: list[str]) -> Counter:
    """Runs per job from the workers' own logs (a line as each run starts, written before anything
    can be lost with the broker): events published over NATS miss the runs made while it was away."""
    return Counter(m.group(1) for text in logs for m in RUN_LINE.finditer(text))


@dataclass
class Observed:
    """What the broker and the workers hold after a run, read for the checks."""

    statuses: dict[str, JobStatus | None]  # per job the client was given
    descriptions: dict[str, tuple[str, int]]  # per job with a stored image: its chunks nuid, its size
    done_events: dict[str, list[str | None]]  # per job: the image nuid each stored `done` event names
    started_events: Counter
    runs: Counter  # per job: runs started, from the workers' logs
    every_key: set[str]  # every status record's key
    chunk_sets: set[str] = field(default_factory=set)  # every chunk set's nuid in the image stream


async def observe(js, statuses: dict[str, JobStatus | None], logs: list[str]) -> Observed:
    """Reads what the checks look at: the jobs' images and events, every record's key, the image
    stream's chunk sets, and the runs in the workers' logs."""
    done_events, started_events = await stored_events(js)
    return Observed(
        statuses=statuses, descriptions=await image_descriptions(js, list(statuses)), done_events=done_events,
        started_events=started_events, runs=runs_logged(logs), every_key=await record_keys(js), chunk_sets=await chunk_sets(js),
    )


async def record_keys(js, *, tries: int = 5) -> set[str]:
    """Every live status record's key. A KV key watcher started just after a broker restart can
    report the bucket empty before its consumer has caught up (nats.py raises NoKeysError): it is
    asked again; a bucket still empty after `tries` is empty, and the checks on lost jobs say so."""
    kv = await js.key_value(names.STATUS_BUCKET)
    for attempt in range(tries):
        try:
            return set(await kv.keys())
        except NoKeysError:
            await asyncio.sleep(0.5 * (attempt + 1))
    return set()


# -- one run --------------------------------------------------------------------------------------


async def run_soak(settings: SoakSettings) -> dict[str, Any]:
    rng = random.Random(settings.seed)
    with tempfile.TemporaryDirectory(prefix="imagegen-soak-") as scratch:
        workdir = Path(settings.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedNats(store_dir=workdir / "nats", port=free_port(), extra_args=["-l", str(workdir / "nats.log")])
        broker.start()
        stack = Stack(settings=settings, workdir=workdir, broker=broker)
        try:
            with OtherLoad() as other:
                result = await _run(stack, rng)
            return result | {"other_load_cores": other.cores}
        finally:
            stack.stop_all()


async def _run(stack: Stack, rng: random.Random) -> dict[str, Any]:
    settings = stack.settings
    url = await stack.start_gateway()
    await asyncio.gather(*(stack.start_worker(slot, slot) for slot in range(settings.workers)))
    busy = BusyWorkers()
    async def quiet(*_args) -> None:  # the broker's restart is planned: no tracebacks for it
        pass

    nc = await nats.connect(
        stack.broker.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet, disconnected_cb=quiet
    )
    try:
        await nc.subscribe(f"{names.EVENTS_SUBJECT_PREFIX}.*", cb=busy.on_event)
        run_tag = f"{settings.seed}-{int(time.time())}"
        jobs = [Submitted(n=n, key=f"soak-{run_tag}-{n}", submitted_at=0.0) for n in range(settings.jobs)]
        window_s = settings.jobs / settings.rate
        chaos = Chaos()
        t0 = time.monotonic()
        chaos_task = asyncio.create_task(make_chaos(stack, busy, window_s, rng, chaos, t0))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            pending = []
            for job in jobs:
                await asyncio.sleep(max(0.0, t0 + job.n / settings.rate - time.monotonic()))
                job.submitted_at = time.time()
                body = {"prompt": f"soak job {job.n}", "width": 64, "height": 64, "steps": settings.steps, "seed": job.n}
                pending.append(asyncio.create_task(submit_one(http, url, job, body, settings.submit_deadline_s)))
            await asyncio.gather(*pending)
        submitted_s = time.monotonic() - t0
        await chaos_task
        js = nc.jetstream(timeout=10)
        taken = [j.job_id for j in jobs if j.job_id]
        statuses = await wait_final(js, taken, settings.drain_timeout_s)
        finished_s = time.monotonic() - t0
        worker_logs = [p for p in stack.started if p is not stack.gateway]
        seen = await observe(js, statuses, [p.log() for p in worker_logs])
    finally:
        await nc.close()
    return figures(settings, jobs, seen, chaos, submitted_s=submitted_s, finished_s=finished_s) | {
        "processes_alive_at_end": {
            "gateway": bool(stack.gateway and stack.gateway.alive),
            "workers": sum(1 for p in stack.workers.values() if p.alive),
        },
        "errors_logged": {
            "gateway": stack.gateway.log().count(" ERROR ") if stack.gateway else 0,
            "workers": sum(p.log().count(" ERROR ") for p in worker_logs),
        },
    }


def figures(
    settings: SoakSettings, jobs: list[Submitted], seen: Observed, chaos: Chaos, *, submitted_s: float, finished_s: float
) -> dict[str, Any]:
    """The run's figures, and per kind of fault the jobs it hit (`problems` turns them into failures).

    A job is `doubled` when two images or two ends reached a client: more than one `done` event, a
    `done` event naming another image than the record, or a stored image other than the one the
    record names (written over the first: the object store keeps one description per name, so only
    the identity of the chunks the description names tells). `done_without_image`: its record names no
    image, none is stored, or the stored one's size differs. `done_without_event`: a follower was never
    told. Records of jobs the client never asked for are strays (a doubled submit)."""
    statuses = seen.statuses
    taken = [j for j in jobs if j.job_id]
    ids = {j.job_id for j in taken}
    states = Counter(statuses[j].state.value if statuses.get(j) else "missing" for j in ids)
    final = {j for j in ids if statuses.get(j) and statuses[j].state.final}
    done = sorted(j for j in ids if statuses.get(j) and statuses[j].state.value == "done")
    not_done = sorted(final - set(done))

    def image_of(job_id: str) -> str | None:
        image = statuses[job_id].image
        return image.chunks_id if image is not None else None

    doubled = sorted(
        j for j in done
        if len(seen.done_events.get(j, [])) > 1
        or any(nuid not in (None, image_of(j)) for nuid in seen.done_events.get(j, []))
        or (j in seen.descriptions and image_of(j) is not None and seen.descriptions[j][0] != image_of(j))
    )
    without_image = sorted(
        j for j in done
        if statuses[j].image is None or j not in seen.descriptions or seen.descriptions[j][1] != statuses[j].image.size
    )
    without_event = sorted(j for j in done if not seen.done_events.get(j))
    strays = sorted(seen.every_key - ids)  # records of jobs the client never asked for (a doubled submit)
    named = {nuid for nuid, _ in seen.descriptions.values()}
    attempts = [statuses[j].attempt for j in done]
    done_set = set(done)
    latencies = [statuses[j.job_id].finished_at - j.submitted_at for j in taken if j.job_id in done_set and statuses[j.job_id].finished_at]
    return {
        "config": asdict(settings) | {"workdir": None},
        "processes": "nats-server (file storage), 1 gateway process, "
        f"{settings.workers} worker processes (imagegen worker --model simulated), the client in this process",
        "jobs": settings.jobs,
        "submitted": len(taken),
        "not_submitted": [j.error for j in jobs if not j.job_id][:10],
        "submit_retries": sum(j.tries - 1 for j in jobs),
        "states": dict(states),
        "final": len(final),
        "done": len(done),
        "lost": len(ids - final) + (settings.jobs - len(taken)),
        "not_done": len(not_done),
        "not_done_ids": not_done[:10],
        "done_with_one_image": len(set(done) - set(doubled) - set(without_image)),
        "done_without_image": len(without_image),
        "done_without_image_ids": without_image[:10],
        "done_without_event": len(without_event),
        "done_without_event_ids": without_event[:10],
        "duplicates": len(doubled) + len(strays),
        "duplicate_ids": doubled[:10] + strays[:10],
        "unnamed_chunk_sets": len(seen.chunk_sets - named),  # images stored, then neither named nor purged
        "kills": len(chaos.kills),
        "kills_of_a_busy_worker": sum(1 for k in chaos.kills if k["job_in_hand"]),
        "broker_restarts": len(chaos.broker_restarts),
        "redeliveries": sum(a - 1 for a in attempts if a > 1),
        "jobs_redelivered": sum(1 for a in attempts if a > 1),
        "runs": sum(seen.runs[j] for j in ids),
        "extra_runs": sum(max(0, seen.runs[j] - statuses[j].attempt) for j in done),
        "started_events_missing": sum(max(0, seen.runs[j] - seen.started_events[j]) for j in ids),
        "latency_s": {
            "p50": round(percentile(latencies, 50), 3),
            "p99": round(percentile(latencies, 99), 3),
            "max": round(max(latencies), 3) if latencies else None,
        },
        "submit_window_s": round(submitted_s, 1),
        "all_final_after_s": round(finished_s, 1),
        "chaos": {"kills": chaos.kills, "broker_restarts": chaos.broker_restarts},
    }


def problems(result: dict[str, Any]) -> list[str]:
    """Each way the run failed, one line each; none: it passed. Extra runs are no failure (a job may run
    twice by design); two images or two ends of one job are."""
    found = []
    checks = [
        ("not_submitted", "jobs never taken by the gateway", len),
        ("lost", "jobs lost (never final)", None),
        ("not_done", "jobs final but not done (failed, cancelled, expired)", None),
        ("duplicates", "jobs doubled (two images or two ends, or a record nobody asked for)", None),
        ("done_without_image", "done jobs without their image", None),
        ("done_without_event", "done jobs whose `done` event is missing", None),
    ]
    for name, what, measure in checks:
        value = result.get(name)
        count = measure(value) if measure else value
        if count:
            ids = result.get(f"{name}_ids") or result.get("duplicate_ids" if name == "duplicates" else "", [])
            found.append(f"{count} {what}" + (f": {', '.join(map(str, ids[:5]))}" if ids else ""))
    return found


def table(result: dict[str, Any]) -> str:
    rows = [
        ["jobs submitted", result["submitted"]],
        ["done", result["done"]],
        ["failed / other final", result["final"] - result["done"]],
        ["lost (never final)", result["lost"]],
        ["duplicates", result["duplicates"]],
        ["done jobs with exactly one image", result["done_with_one_image"]],
        ["done jobs without their image / without a `done` event", f"{result['done_without_image']} / {result['done_without_event']}"],
        ["worker SIGKILLs (holding a job)", f"{result['kills']} ({result['kills_of_a_busy_worker']})"],
        ["broker restarts (SIGKILL)", result["broker_restarts"]],
        ["redeliveries (tries past the first)", result["redeliveries"]],
        ["runs (workers' logs)", result["runs"]],
        ["extra runs of a delivery the restarted broker forgot", result["extra_runs"]],
        ["runs whose `started` event was lost with the broker", result["started_events_missing"]],
        ["submits retried after 503 / no answer", result["submit_retries"]],
        ["latency submit -> done p50", f"{result['latency_s']['p50']:.2f} s"],
        ["latency submit -> done p99", f"{result['latency_s']['p99']:.2f} s"],
        ["all final after", f"{result['all_final_after_s']:.0f} s"],
    ]
    return markdown_table(["", "figure"], rows)


def parse_args(argv: list[str] | None = None) -> tuple[SoakSettings, Path]:
    defaults = SoakSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=whole(1), default=defaults.jobs)
    p.add_argument("--workers", type=whole(1), default=defaults.workers)
    p.add_argument("--rate", type=positive, default=defaults.rate, help="submissions per second")
    p.add_argument("--kills", type=whole(0), default=defaults.kills, help="worker SIGKILLs during the run")
    p.add_argument("--broker-outage", type=non_negative, default=defaults.broker_outage_s, help="seconds the broker stays down")
    p.add_argument("--steps", type=whole(1), default=defaults.steps)
    p.add_argument("--step-s", type=positive, default=defaults.step_s)
    p.add_argument("--ack-wait", type=positive, default=defaults.ack_wait_s)
    p.add_argument("--max-deliver", type=whole(1), default=defaults.max_deliver)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--workdir", default=None, help="keep logs and the broker's store here")
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    a = p.parse_args(argv)
    settings = SoakSettings(
        jobs=a.jobs, workers=a.workers, rate=a.rate, kills=a.kills, broker_outage_s=a.broker_outage, steps=a.steps,
        step_s=a.step_s, ack_wait_s=a.ack_wait, max_deliver=a.max_deliver, seed=a.seed, workdir=a.workdir,
    )
    return settings, a.out


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": "soak", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **result}
    out.write_text(json.dumps(body, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    settings, out = parse_args(argv)
    result = asyncio.run(run_soak(settings))
    write(result, out)
    print(table(result))
    found = problems(result)
    for line in found:
        print("FAILED:", line)
    print(f"\nwritten to {out}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
