"""Webhooks under load: what calling a webhook for every job costs, and how late the calls come.

Two gateway processes (webhooks go to one of them per call), 8 simulated workers of zero time in one
process, and a receiver in this process on loopback. The same number of jobs is run twice, once
without webhooks and once with a `completed` webhook each, submitted at a steady rate (`--rate`,
below what the two cores carry, so that the lag is the calls' own and not a backlog's) by 32 clients
to the two gateways in turn:

- lag: time the receiver got the call minus the job's `finished_at`, stamped by the worker;
- calls per job: 1 when each moment is called once (more: duplicates), and jobs never called;
- CPU milliseconds per job of each gateway, of nats-server and of the workers, without and with
  webhooks: the difference is what the calls cost.

  python bench/webhooks.py            # about 1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aiohttp import web  # noqa: E402

from common import (  # noqa: E402
    SMALL_JOB,
    CpuMeter,
    OtherLoad,
    http_session,
    markdown_table,
    open_stack,
    positive,
    submit,
    summary_ms,
    whole,
    write_results,
)

CLIENTS = 32


class Receiver:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lag_s: list[float] = []
        self.expected: set[str] = set()
        self.all_in = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        received = time.time()
        job = json.loads(await request.read())
        self.calls[job["job_id"]] += 1
        if self.calls[job["job_id"]] == 1:
            self.lag_s.append(received - job["finished_at"])
        if self.expected and self.expected <= self.calls.keys():
            self.all_in.set()
        return web.Response(text="ok")


async def run_jobs(http, urls: list[str], jobs: int, body: dict, *, rate: float | None = None) -> list[str]:
    """Submits `jobs` jobs from CLIENTS clients, to the gateways in turn, `rate` a second (None: as
    fast as they go); their ids."""
    job_ids: list[str] = []
    counter = iter(range(jobs))
    start = time.monotonic()

    async def client() -> None:
        for i in counter:
            if rate is not None:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            job_ids.append(await submit(http, urls[i % len(urls)], {**body, "seed": i}))

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return job_ids


async def wait_done(http, url: str, job_ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for job_id in job_ids:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} not finished within {timeout_s}s")
            async with http.get(f"{url}/v1/jobs/{job_id}", params={"wait": str(min(left, 60.0))}) as r:
                if (await r.json())["state"] in ("done", "failed", "cancelled", "expired"):
                    break


async def phase(stack, http, receiver: Receiver | None, urls: list[str], jobs: int, *, hook: str | None, rate: float) -> dict:
    pids = stack.pids()
    meters = {name: CpuMeter(pid) for name, pid in pids.items()}
    for meter in meters.values():
        meter.start()
    started = time.monotonic()
    body = {**SMALL_JOB, "cache": False} | ({"webhook": hook} if hook else {})
    job_ids = await run_jobs(http, urls, jobs, body, rate=rate)
    await wait_done(http, urls[0], job_ids, timeout_s=120)
    result: dict = {"jobs": len(job_ids)}
    if receiver is not None:
        receiver.expected = set(job_ids)
        try:
            await asyncio.wait_for(receiver.all_in.wait(), 60)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(2.0)  # a duplicate would come by now
        calls = [receiver.calls.get(job_id, 0) for job_id in job_ids]
        result["never_called"] = sum(1 for n in calls if n == 0)
        result["called_more_than_once"] = sum(1 for n in calls if n > 1)
        result["lag"] = summary_ms([lag for lag in receiver.lag_s])
    elapsed = time.monotonic() - started
    shares = {name: meter.stop() for name, meter in meters.items()}
    result["cpu_ms_per_job"] = {name: round(share * elapsed * 1000 / max(len(job_ids), 1), 2) for name, share in shares.items()}
    result["seconds"] = round(elapsed, 1)
    return result


async def main(args: argparse.Namespace) -> int:
    results: dict = {"config": vars(args), "processes": "nats-server, two gateway processes, one process of 8 simulated workers, clients and the receiver in the benchmark process"}
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
    try:
        async with AsyncExitStack() as es:
            stack = await open_stack(es, gateway=False)
            gateways = [await stack.start_gateway(private_webhooks=True, name=f"gateway-{i}") for i in range(2)]
            urls = [f"http://127.0.0.1:{g.port}" for g in gateways]
            await stack.start_workers(8, per_process=8)
            await asyncio.sleep(0.5)
            async with http_session() as http:
                await run_jobs(http, urls, 64, SMALL_JOB)  # warm-up: connections, consumers
                with OtherLoad() as other:
                    results["without_webhooks"] = await phase(stack, http, None, urls, args.jobs, hook=None, rate=args.rate)
                    results["with_webhooks"] = await phase(stack, http, receiver, urls, args.jobs, hook=hook, rate=args.rate)
                results["other_load_cores"] = other.cores
    finally:
        await runner.cleanup()
    path = write_results("webhooks", results)

    plain, hooked = results["without_webhooks"], results["with_webhooks"]
    rows = [[name, plain["cpu_ms_per_job"].get(name, "-"), hooked["cpu_ms_per_job"].get(name, "-"),
             round(hooked["cpu_ms_per_job"].get(name, 0) - plain["cpu_ms_per_job"].get(name, 0), 2)]
            for name in hooked["cpu_ms_per_job"]]
    print(markdown_table(["process", "CPU ms per job, no webhooks", "with a webhook each", "difference"], rows))
    print()
    lag = hooked["lag"]
    print(f"{hooked['jobs']} jobs with a webhook: lag (worker's finished_at -> received) p50 {lag['p50_ms']} ms, "
          f"p99 {lag['p99_ms']} ms, max {lag['max_ms']} ms; never called {hooked['never_called']}, "
          f"called more than once {hooked['called_more_than_once']}")
    print(f"other load on the machine while measuring: {results['other_load_cores']} cores")
    print(f"results: {path}")
    return 0 if hooked["never_called"] == 0 and hooked["called_more_than_once"] == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=whole(1), default=1000, help="jobs per phase")
    parser.add_argument("--rate", type=positive, default=50.0, help="jobs submitted per second")
    sys.exit(asyncio.run(main(parser.parse_args())))
