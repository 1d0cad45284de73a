"""Failover: a 3-node JetStream cluster loses nodes while jobs flow; what a client feels, per kill.

Three nats-servers on loopback (cluster routes on loopback ports, every stream, KV bucket and object
store at 3 replicas), two gateway processes and three simulated worker processes, each connected to
all three nodes. Jobs go in over HTTP at a steady rate, alternately to each gateway, three in four
with their own Idempotency-Key (a 503 is sent again with the same key after its Retry-After, capped
at 0.5 s), every fourth without one (its 503 is sent again as a new request: the refused one must
leave no record the API shows, and must never run).
Meanwhile: the job stream's leader is SIGKILLed and started again after `--down-s`; a worker holding
a job is SIGKILLed (and replaced); then the job stream's next leader is SIGKILLed for good.

Per node kill: seconds until the job stream has a leader again (asked every 0.1 s), and until the
last of the job's path (job stream, status bucket, image store, the workers' consumer) has, the slowest
submit answer and the slowest 503 around it, seconds from the kill until submits are accepted again,
and the longest gap between job completions around it (and where it ended, from the last election).
At the end, every job from the broker's own records: lost = not done, duplicated = more than one
`done` event or an image other than the one its record names.

  python bench/failover.py                 # 400 jobs at 10/s, ~1.5 min
  python bench/failover.py --jobs 200      # shorter

Writes bench/results/failover.json (or --out) and prints a table per kill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
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

from common import RESULTS, machine, markdown_table, positive, whole  # noqa: E402
from imagegen.embedded_nats import EmbeddedCluster, free_port  # noqa: E402
from schemas import names  # noqa: E402
from schemas.names import Tier  # noqa: E402
from schemas.jetstream import Topology, ensure_topology  # noqa: E402
from soak import (  # noqa: E402
    BusyWorkers, Proc, image_descriptions, kill_all, read_statuses, runs_logged, spawn, start_simulated_worker,
)


@dataclass(frozen=True, kw_only=True)
class FailoverSettings:
    jobs: int = 400
    rate: float = 10.0  # submissions per second
    workers: int = 3
    gateways: int = 2
    steps: int = 4
    step_s: float = 0.05  # simulated engine: seconds per step
    ack_wait_s: float = 30.0
    first_kill_s: float = 8.0  # after the first submit: the job stream's leader is killed
    down_s: float = 5.0  # it is started again this long after
    worker_kill_s: float | None = 20.0  # a worker holding a job is killed (None: none)
    second_kill_s: float | None = 28.0  # the job stream's next leader is killed for good (None: none)
    drain_timeout_s: float = 90.0
    keyless_every: int = 4  # every 4th job is sent without an Idempotency-Key (a 503 is then sent as a new request)
    seed: int = 1


@dataclass
class Try:
    job: int
    sent: float  # monotonic
    answered: float
    status: int  # 0: no answer
    retry_after: str | None = None


@dataclass
class NodeKill:
    node: str
    at: float  # monotonic
    led_again_at: float | None = None  # the job stream has a leader again
    path_led_at: float | None = None  # every stream and consumer a job goes through has one again
    restarted_at: float | None = None


@dataclass
class Run:
    settings: FailoverSettings
    cluster: EmbeddedCluster
    workdir: Path
    started: list[Proc] = field(default_factory=list)
    workers: dict[int, Proc] = field(default_factory=dict)
    tries: list[Try] = field(default_factory=list)
    kills: list[NodeKill] = field(default_factory=list)
    worker_kills: list[dict] = field(default_factory=list)

    def flags(self) -> list[str]:
        return ["--nats", self.cluster.url, "--replicas", "3", "--ack-wait", str(self.settings.ack_wait_s)]

    async def start_gateway(self, n: int) -> str:
        port = free_port()
        proc = spawn(self.workdir, f"gateway{n}", ["gateway", "--port", str(port), *self.flags()], self.started)
        await proc.wait_for_log(f"gateway listening on http://127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"

    async def start_worker(self, slot: int, generation: int) -> Proc:
        proc = self.workers[slot] = await start_simulated_worker(
            self.workdir, f"failover-w{slot}-{generation}", self.settings.step_s, self.flags(), self.started
        )
        return proc

    def stop_all(self) -> None:
        kill_all(self.started)
        self.cluster.stop()


async def jetstream_ready(url: str, topology: Topology, *, timeout_s: float = 60) -> None:
    """Waits for the cluster's JetStream (its meta leader) and creates the streams at 3 replicas."""
    nc = await nats.connect(url.split(","), max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await ensure_topology(js, topology)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


PATH_STREAMS = (names.JOBS_STREAM, f"KV_{names.STATUS_BUCKET}", f"OBJ_{names.IMAGES_BUCKET}")


async def job_stream_leader(js) -> str | None:
    return await leader_of(js, names.JOBS_STREAM)


async def leader_of(js, stream: str, consumer: str | None = None) -> str | None:
    try:
        info = await (js.consumer_info(stream, consumer) if consumer else js.stream_info(stream))
    except Exception:
        return None
    return info.cluster.leader if info.cluster and info.cluster.leader else None


async def path_led(js, killed: str) -> bool:
    """Whether the job stream, the status bucket, the image store and the workers' consumer of the
    normal tier each have a leader other than the killed node."""
    for stream, consumer in [*((s, None) for s in PATH_STREAMS), (names.JOBS_STREAM, names.jobs_consumer(Tier.NORMAL))]:
        leader = await leader_of(js, stream, consumer)
        if leader is None or leader == killed:
            return False
    return True


async def kill_leader(run: Run, js, *, restart_after_s: float | None) -> NodeKill:
    leader = None
    while leader is None:
        leader = await job_stream_leader(js)
    kill = NodeKill(node=leader, at=time.monotonic())
    run.cluster.kill(leader)
    run.kills.append(kill)
    while kill.path_led_at is None:
        now = await job_stream_leader(js)
        if kill.led_again_at is None and now is not None and now != leader:
            kill.led_again_at = time.monotonic()
        if kill.led_again_at is not None and await path_led(js, leader):
            kill.path_led_at = time.monotonic()
        await asyncio.sleep(0.1)
    if restart_after_s is not None:
        await asyncio.sleep(max(0.0, kill.at + restart_after_s - time.monotonic()))
        await asyncio.get_running_loop().run_in_executor(None, run.cluster.node(leader).start)
        kill.restarted_at = time.monotonic()
    return kill


async def kill_busy_worker(run: Run, busy: BusyWorkers, generation: int) -> None:
    for _ in range(100):
        holding = {name for name in busy.holding}
        slots = [slot for slot, proc in run.workers.items() if proc.name in holding and proc.alive]
        if slots:
            break
        await asyncio.sleep(0.05)
    slot = slots[0] if slots else 0
    victim = run.workers[slot]
    job_id = busy.holding.get(victim.name)
    await victim.kill()
    killed_at = time.monotonic()
    await run.start_worker(slot, generation)
    run.worker_kills.append({"worker": victim.name, "job_in_hand": job_id, "replacement_ready_s": round(time.monotonic() - killed_at, 2)})


async def submit(http: aiohttp.ClientSession, url: str, n: int, key: str | None, body: dict, run: Run, deadline_s: float = 60) -> str | None:
    """POSTs until the job is taken; a 503 is sent again after its Retry-After (at most 0.5 s), with
    the same Idempotency-Key when it has one (else as a new request)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            async with http.post(f"{url}/v1/jobs", json=body, headers={"Idempotency-Key": key} if key else {}, timeout=aiohttp.ClientTimeout(total=15)) as r:
                run.tries.append(Try(n, sent, time.monotonic(), r.status, r.headers.get("Retry-After")))
                if r.status == 202:
                    return (await r.json())["job_id"]
                if r.status != 503:
                    return None
                wait = min(0.5, float(r.headers.get("Retry-After") or 0.5))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            run.tries.append(Try(n, sent, time.monotonic(), 0))
            wait = 0.5
        await asyncio.sleep(wait)
    return None


async def done_events(js) -> dict[str, list[str | None]]:
    """Per job, the image nuid of each `done` event the events stream kept."""
    found: dict[str, list[str | None]] = {}
    total = (await js.stream_info(names.EVENTS_STREAM)).state.messages
    sub = await js.subscribe(f"{names.EVENTS_SUBJECT_PREFIX}.>", ordered_consumer=True)
    try:
        for _ in range(total):
            try:
                msg = await sub.next_msg(timeout=2)
            except nats.errors.TimeoutError:
                break
            event = msgpack.unpackb(msg.data)
            if event.get("type") == "done":
                found.setdefault(event.get("job_id"), []).append((event.get("image") or {}).get("chunks_id"))
    finally:
        await sub.unsubscribe()
    return found


async def execute(settings: FailoverSettings, workdir: Path) -> dict[str, Any]:
    cluster = EmbeddedCluster(store_dir=workdir / "nats").start()
    run = Run(settings=settings, cluster=cluster, workdir=workdir)
    try:
        await jetstream_ready(cluster.url, Topology(replicas=3, ack_wait_s=settings.ack_wait_s))
        urls = [await run.start_gateway(n) for n in range(settings.gateways)]
        await asyncio.gather(*(run.start_worker(slot, slot) for slot in range(settings.workers)))
        return await _flow(run, urls)
    finally:
        run.stop_all()


async def _flow(run: Run, urls: list[str]) -> dict[str, Any]:
    settings = run.settings
    async def quiet(*_args) -> None:  # the kills are planned: no tracebacks for them
        pass

    nc = await nats.connect(
        run.cluster.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=quiet, disconnected_cb=quiet
    )
    busy = BusyWorkers()
    await nc.subscribe(f"{names.EVENTS_SUBJECT_PREFIX}.*", cb=busy.on_event)
    js = nc.jetstream(timeout=0.5)
    tag = f"{settings.seed}-{int(time.time())}"
    ids: dict[int, str | None] = {}
    t0 = time.monotonic()
    wall0 = time.time()

    async def chaos() -> None:
        await asyncio.sleep(settings.first_kill_s)
        await kill_leader(run, js, restart_after_s=settings.down_s)
        if settings.worker_kill_s is not None:
            await asyncio.sleep(max(0.0, t0 + settings.worker_kill_s - time.monotonic()))
            await kill_busy_worker(run, busy, settings.workers)
        if settings.second_kill_s is not None:
            await asyncio.sleep(max(0.0, t0 + settings.second_kill_s - time.monotonic()))
            await kill_leader(run, js, restart_after_s=None)

    async def one(http, n: int) -> None:
        body = {"prompt": f"failover job {n}", "width": 64, "height": 64, "steps": settings.steps, "seed": n}
        key = None if settings.keyless_every and n % settings.keyless_every == 0 else f"failover-{tag}-{n}"
        ids[n] = await submit(http, urls[n % len(urls)], n, key, body, run)

    chaos_task = asyncio.create_task(chaos())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as http:
        pending = []
        for n in range(settings.jobs):
            await asyncio.sleep(max(0.0, t0 + n / settings.rate - time.monotonic()))
            pending.append(asyncio.create_task(one(http, n)))
        await asyncio.gather(*pending)
    await chaos_task
    js = nc.jetstream(timeout=5)
    taken = [job_id for job_id in ids.values() if job_id]
    deadline = time.monotonic() + settings.drain_timeout_s
    while True:
        try:
            statuses = await read_statuses(js, taken)
        except Exception:
            statuses = {}
        if statuses and all(s is not None and s.state.final for s in statuses.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    events = await done_events(js)
    descriptions = await image_descriptions(js, taken)
    kv = await js.key_value(names.STATUS_BUCKET)
    others = await read_statuses(js, sorted(set(await kv.keys()) - set(taken)))  # records of no accepted job
    runs = runs_logged([p.log() for p in run.started if p.name.startswith("failover-w")])
    await nc.close()
    return figures(run, ids, statuses, events, descriptions, t0=t0, wall0=wall0) | {
        "records_of_refused_submits": len(others),
        "visible_records_of_refused_submits": sum(1 for s in others.values() if s is not None and not s.deleted),
        "runs_of_refused_submits": sum(n for job_id, n in runs.items() if job_id not in set(taken)),
    }


def figures(run: Run, ids: dict, statuses: dict, events: dict, descriptions: dict, *, t0: float, wall0: float) -> dict[str, Any]:
    settings = run.settings
    taken = [j for j in ids.values() if j]
    done = [j for j in taken if statuses.get(j) and statuses[j].state.value == "done"]
    duplicated = [
        j for j in done
        if len(events.get(j, [])) > 1
        or (statuses[j].image is not None and descriptions.get(j, (None,))[0] != statuses[j].image.chunks_id)
    ]
    completions = sorted(statuses[j].finished_at - wall0 for j in done if statuses[j].finished_at)  # since t0
    kills = []
    for k in run.kills:
        kill_s = k.at - t0
        elected_s = (k.led_again_at or k.at) - t0
        path_s = (k.path_led_at or k.at) - t0
        window = [t for t in run.tries if k.at - 1 <= t.sent <= (k.led_again_at or k.at) + 2]
        refused = [t for t in window if t.status == 503]
        last_refused = max((t.answered for t in refused), default=k.at)
        accepted = [t.answered for t in run.tries if t.status == 202 and t.sent >= last_refused - 0.001 and t.sent >= k.at]
        near = [c for c in completions if kill_s - 1 <= c <= path_s + 15]
        gaps = [(b - a, a, b) for a, b in zip(near, near[1:])]
        gap, gap_from, gap_to = max(gaps, default=(0.0, kill_s, kill_s))
        kills.append({
            "node": k.node,
            "at_s": round(kill_s, 2),
            "restarted": k.restarted_at is not None,
            "election_s": round(elected_s - kill_s, 2),
            "path_elections_s": round(path_s - kill_s, 2),
            "slowest_submit_answer_s": round(max((t.answered - t.sent for t in window), default=0.0), 2),
            "slowest_refused_submit_s": round(max((t.answered - t.sent for t in refused), default=0.0), 2),
            "refused_submits": len(refused),
            "refused_without_retry_after": sum(1 for t in refused if not t.retry_after),
            "no_answer": sum(1 for t in window if t.status == 0),
            "accepted_again_after_s": round(min(accepted, default=k.at) - k.at, 2),
            "longest_completion_gap_s": round(gap, 2),
            "gap_ended_after_election_s": round(gap_to - path_s, 2),
            "done_after_election": sum(1 for c in completions if c > path_s),
        })
    latencies = sorted(statuses[j].finished_at - statuses[j].submitted_at for j in done if statuses[j].finished_at)
    in_killed_hands = {k["job_in_hand"] for k in run.worker_kills}
    waited_ack = sorted(  # tried again only after the ack wait, though no worker holding them was killed: a nak lost
        j for j in done if statuses[j].finished_at and j not in in_killed_hands and statuses[j].attempt > 1
        and statuses[j].finished_at - statuses[j].submitted_at >= settings.ack_wait_s
    )
    return {
        "config": asdict(settings),
        "processes": f"3 nats-servers (cluster on loopback, R3), {settings.gateways} gateway processes, "
        f"{settings.workers} simulated worker processes, the client in this process",
        "jobs": settings.jobs,
        "submitted": len(taken),
        "done": len(done),
        "lost": settings.jobs - len(done),
        "duplicated": len(duplicated),
        "duplicated_ids": duplicated[:10],
        "states": dict(Counter(statuses[j].state.value if statuses.get(j) else "missing" for j in taken)),
        "http_500s": sum(1 for t in run.tries if t.status >= 500 and t.status != 503),
        "redelivered_jobs": sum(1 for j in done if statuses[j].attempt > 1),
        "slowest_job_s": round(latencies[-1], 2) if latencies else None,
        "waited_out_ack_wait": len(waited_ack),
        "waited_out_ack_wait_ids": waited_ack[:10],
        "kills": kills,
        "worker_kills": run.worker_kills,
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        [k["node"] + (" (restarted)" if k["restarted"] else " (for good)"), k["election_s"], k["path_elections_s"], k["slowest_submit_answer_s"],
         k["slowest_refused_submit_s"], k["refused_submits"], k["accepted_again_after_s"], k["longest_completion_gap_s"],
         k["gap_ended_after_election_s"]]
        for k in result["kills"]
    ]
    head = ["job stream leader killed", "its election s", "last election s", "slowest submit s", "slowest 503 s", "503s",
            "accepted again after s", "longest completion gap s", "gap ended after last election s"]
    totals = (f"\n{result['done']}/{result['jobs']} done, lost {result['lost']}, duplicated {result['duplicated']}, "
              f"HTTP 5xx other than 503: {result['http_500s']}, redelivered {result['redelivered_jobs']}, "
              f"slowest job {result['slowest_job_s']} s (the killed worker's job waits out the ack wait), "
              f"other jobs that waited out the ack wait: {result['waited_out_ack_wait']}")
    if "records_of_refused_submits" in result:
        totals += (f"\nrefused submits without a key: records left {result['records_of_refused_submits']} "
                   f"(shown by the API: {result['visible_records_of_refused_submits']}), runs {result['runs_of_refused_submits']}")
    return markdown_table(head, rows) + totals


def problems(result: dict[str, Any]) -> list[str]:
    """What misses the failover targets: lost or duplicated jobs, 500s, a 503 slower than 1 s or
    without Retry-After, completions resuming more than 2 s after an election."""
    found = []
    if result["lost"]:
        found.append(f"{result['lost']} jobs lost")
    if result["duplicated"]:
        found.append(f"{result['duplicated']} jobs duplicated")
    if result["http_500s"]:
        found.append(f"{result['http_500s']} answers 5xx other than 503")
    if result.get("visible_records_of_refused_submits"):
        found.append(f"{result['visible_records_of_refused_submits']} refused submits left a record the API shows")
    if result.get("runs_of_refused_submits"):
        found.append(f"{result['runs_of_refused_submits']} runs of jobs whose submit was refused")
    if result["waited_out_ack_wait"]:
        found.append(f"{result['waited_out_ack_wait']} jobs came back only after the ack wait")
    for k in result["kills"]:
        if k["slowest_refused_submit_s"] > 1.0:
            found.append(f"kill of {k['node']}: a 503 took {k['slowest_refused_submit_s']} s")
        if k["refused_without_retry_after"]:
            found.append(f"kill of {k['node']}: {k['refused_without_retry_after']} 503s without Retry-After")
        if k["gap_ended_after_election_s"] > 2.0:
            found.append(f"kill of {k['node']}: completions resumed {k['gap_ended_after_election_s']} s after the election")
    return found


def parse_args(argv: list[str] | None = None) -> tuple[FailoverSettings, Path, Path | None]:
    d = FailoverSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=whole(1), default=d.jobs)
    p.add_argument("--rate", type=positive, default=d.rate, help="submissions per second")
    p.add_argument("--ack-wait", type=positive, default=d.ack_wait_s)
    p.add_argument("--down-s", type=positive, default=d.down_s, help="seconds the first killed node stays down")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", type=Path, default=None, help="keep the logs and the servers' stores here")
    p.add_argument("--out", type=Path, default=RESULTS / "failover.json")
    a = p.parse_args(argv)
    return FailoverSettings(jobs=a.jobs, rate=a.rate, ack_wait_s=a.ack_wait, down_s=a.down_s, seed=a.seed), a.out, a.workdir


def main(argv: list[str] | None = None) -> int:
    settings, out, workdir = parse_args(argv)
    random.seed(settings.seed)
    with tempfile.TemporaryDirectory(prefix="imagegen-failover-") as scratch:
        folder = workdir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(execute(settings, folder))
    found = problems(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": "failover", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **result, "problems": found}
    out.write_text(json.dumps(body, indent=2, default=str) + "\n")
    print(table(result))
    for line in found:
        print("MISSED:", line)
    print(f"\nwritten to {out}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
