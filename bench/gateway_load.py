"""One gateway process under many concurrent clients: status polls and submissions per second with
their latency, and 1,000 open WebSocket clients following jobs with the event delivery lag.

Status polls and submissions come from wrk (one thread, 64 connections; `apt-get install wrk`) or,
without wrk, from an aiohttp load generator in another process. The gateway is pinned to core 0 and
the load generator to core 1, so "per second" is per gateway core; nats-server runs unpinned.

- status: `GET /api/status?task_id=` and `GET /v1/jobs/{id}` over a queue of 100 and then 1,000
  queued jobs waiting behind one busy worker (each request asks for another job, so positions and
  ETAs are computed for every place in the queue), and `/api/status` of finished jobs.
- submissions: `POST /api/generate` and `POST /v1/jobs` (64x64, 1 step) while the queue grows.
- sockets: 1,000 jobs, one WebSocket each (`/v1/jobs/{id}/ws`) from an aiohttp client in another
  process; 32 simulated workers (10 steps of 100 ms) then run the jobs. Lag = time received minus the
  event's `ts`, stamped by the worker, for every live event (replayed ones left out).

  python bench/gateway_load.py          # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from common import (  # noqa: E402
    FINAL_EVENTS,
    SMALL_JOB,
    CpuMeter,
    RssSampler,
    http_load,
    http_session,
    markdown_table,
    open_stack,
    percentile,
    positive,
    submit,
    summary_ms,
    whole,
    write_results,
    wrk_available,
)

TARGET_STATUS_PER_S = 3000
TARGET_SOCKETS = 1000
TARGET_LAG_P99_MS = 100.0
GATEWAY_CPU, LOAD_CPU = 0, 1


def pin(pid: int, cpu: int) -> None:
    try:
        psutil.Process(pid).cpu_affinity([cpu])
    except (AttributeError, ValueError, psutil.Error):
        pass


async def submit_many(http, url: str, n: int, body: dict, concurrency: int = 16) -> list[str]:
    ids: list[str] = [""] * n
    next_i = 0

    async def one() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            ids[i] = await submit(http, url, {**body, "seed": i})

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return ids


async def measured(stack, label: str, **load) -> dict:
    cpu = CpuMeter(stack.gateway.pid)
    cpu.start()
    result = await http_load(stack.url, cpu=LOAD_CPU, workdir=stack.workdir, **load)
    result["gateway_cpu_share"] = round(cpu.stop(), 2)
    result["label"] = label
    print(f"  {label}: {result['requests_per_s']:,.0f}/s p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms", flush=True)
    return result


async def polls_and_submissions(args: argparse.Namespace) -> dict:
    out: dict = {}
    async with AsyncExitStack() as es:
        stack = await open_stack(es)
        pin(stack.gateway.pid, GATEWAY_CPU)
        async with http_session() as http:
            # finished jobs: one quick worker runs a few, then gives way to a busy one
            await stack.start_workers(1)
            done_ids = [(await _run_and_id(http, stack.url, i)) for i in range(50)]
            await stack.stop_workers()
            await stack.start_workers(1, step_s=5.0)  # 100 steps of 5 s: busy for the whole run
            await submit(http, stack.url, {**SMALL_JOB, "steps": 100, "seed": 1})
            await asyncio.sleep(1.0)
            with RssSampler({"gateway": stack.gateway.pid}) as rss:
                idle_rss = rss.sample()["gateway"]
                queued = await submit_many(http, stack.url, 100, SMALL_JOB)
                status = []
                load = dict(connections=args.connections, duration_s=args.duration)
                status.append(await measured(stack, "mflux status, done jobs", paths=[f"/api/status?task_id={i}" for i in done_ids], **load))
                status.append(await measured(stack, "mflux status, 100 queued", paths=[f"/api/status?task_id={i}" for i in queued], **load))
                status.append(await measured(stack, "native status, 100 queued", paths=[f"/v1/jobs/{i}" for i in queued], **load))
                queued += await submit_many(http, stack.url, 900, SMALL_JOB)
                status.append(await measured(stack, "mflux status, 1,000 queued", paths=[f"/api/status?task_id={i}" for i in queued], **load))
                status.append(await measured(stack, "native status, 1,000 queued", paths=[f"/v1/jobs/{i}" for i in queued], **load))
                body = json.dumps(SMALL_JOB)
                submissions = [
                    await measured(stack, "mflux submit (queue 1,000 and growing)", paths=["/api/generate"], method="POST", body=body, **load),
                    await measured(stack, "native submit (queue growing)", paths=["/v1/jobs"], method="POST", body=body, **load),
                ]
            out["status"] = status
            out["submissions"] = submissions
            out["gateway_rss_mib"] = {"idle": round(idle_rss, 1), "peak": round(rss.peak["gateway"], 1)}
            out["queue_after"] = len(queued) + sum(s["requests"] or 0 for s in submissions)
            await stack.stop_workers(timeout=0)
    return out


async def _run_and_id(http, url: str, i: int) -> str:
    job_id = await submit(http, url, {**SMALL_JOB, "seed": i})
    for _ in range(500):
        async with http.get(f"{url}/v1/jobs/{job_id}") as r:
            if (await r.json())["state"] == "done":
                return job_id
        await asyncio.sleep(0.01)
    raise RuntimeError(f"job {job_id} did not finish")


async def sockets(args: argparse.Namespace) -> dict:
    n = args.sockets
    async with AsyncExitStack() as es:
        stack = await open_stack(es)
        pin(stack.gateway.pid, GATEWAY_CPU)
        async with http_session() as http:
            ids = await submit_many(http, stack.url, n, {**SMALL_JOB, "steps": 10})
        spec = stack.workdir / "ws-spec.json"
        spec.write_text(json.dumps({"url": stack.url, "ids": ids, "connect_concurrency": 50, "timeout_s": args.ws_timeout}))
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--ws-client", str(spec), stdout=asyncio.subprocess.PIPE
        )
        es.push_async_callback(_reap, client)
        with RssSampler({"gateway": stack.gateway.pid}) as rss:
            before = rss.sample()["gateway"]
            started = time.monotonic()
            line = (await asyncio.wait_for(client.stdout.readline(), 120)).decode().strip()
            if not line.startswith("OPEN"):
                raise RuntimeError(f"WebSocket client failed: {line}")
            open_s = time.monotonic() - started
            open_rss = rss.sample()["gateway"]
            print(f"  {n} sockets open in {open_s:.1f}s; gateway RSS {open_rss:.0f} MiB", flush=True)
            cpu = CpuMeter(stack.gateway.pid)
            cpu.start()
            await stack.start_workers(args.ws_workers, step_s=0.1)
            result = json.loads((await asyncio.wait_for(client.stdout.readline(), args.ws_timeout + 60)).decode())
            result["gateway_cpu_share"] = round(cpu.stop(), 2)
        result.update(
            sockets=n, workers=args.ws_workers, job="10 steps of 100 ms", open_s=round(open_s, 1),
            gateway_rss_mib={"before": round(before, 1), "sockets_open": round(open_rss, 1), "peak": round(rss.peak["gateway"], 1)},
        )
        await stack.stop_workers(timeout=0)
    return result


async def _reap(proc) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def ws_client(spec_path: str) -> None:
    """Opens one socket per job, reports when all are open, then gathers event lags until every job ends."""
    spec = json.loads(Path(spec_path).read_text())
    url, ids = spec["url"], spec["ids"]
    gate = asyncio.Semaphore(spec["connect_concurrency"])
    lags: list[float] = []
    by_type: dict[str, list[float]] = {}
    opened = finals = queue_updates = 0
    errors: list[str] = []
    all_open = asyncio.Event()
    deadline = time.monotonic() + spec["timeout_s"]

    async def follow(http, job_id: str) -> None:
        nonlocal opened, finals, queue_updates
        try:
            async with gate:
                ws = await http.ws_connect(f"{url}/v1/jobs/{job_id}/ws", autoping=True)
            opened_at = time.time()
            opened += 1
            if opened == len(ids):
                all_open.set()
            async with ws:
                while True:
                    msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                    now = time.time()
                    if msg.type.name != "TEXT":
                        errors.append(f"{job_id}: socket ended with {msg.type.name}")
                        return
                    event = json.loads(msg.data)
                    if event.get("type") == "queued":  # where the job stands, from the gateway's view: no worker event
                        queue_updates += 1
                    elif event.get("ts", 0) >= opened_at:
                        lag = now - event["ts"]
                        lags.append(lag)
                        by_type.setdefault(event["type"], []).append(lag)
                    if event.get("type") in FINAL_EVENTS:
                        finals += 1
                        return
        except Exception as exc:  # counted, not raised: one failure must not hide the others
            errors.append(f"{job_id}: {type(exc).__name__}: {exc}")
            if not all_open.is_set() and opened + len(errors) >= len(ids):
                all_open.set()

    async with http_session(0) as http:
        tasks = [asyncio.create_task(follow(http, job_id)) for job_id in ids]

        async def announce() -> None:
            await all_open.wait()
            print(f"OPEN {opened}", flush=True)

        announcer = asyncio.create_task(announce())
        started = time.monotonic()
        await asyncio.gather(*tasks)
        announcer.cancel()
        if not all_open.is_set():
            print(f"OPEN {opened}", flush=True)
    summary = summary_ms(lags)
    print(json.dumps({
        "events": len(lags),
        "lag": summary,
        "lag_p99_by_type_ms": {t: round(percentile([x * 1000 for x in v], 99), 2) for t, v in by_type.items()},
        "finished_jobs": finals,
        "queue_updates": queue_updates,
        "run_s": round(time.monotonic() - started, 1),
        "errors": len(errors),
        "first_errors": errors[:3],
    }), flush=True)


async def main(args: argparse.Namespace) -> int:
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "ws_client"}, "load_generator": "wrk, one thread" if wrk_available() else "aiohttp, another process"}
    results["targets"] = {"status_per_s": TARGET_STATUS_PER_S, "sockets": TARGET_SOCKETS, "event_lag_p99_ms": TARGET_LAG_P99_MS}
    results["meets_target"] = {}
    verdicts = []
    if args.only in (None, "http"):
        print("status polls and submissions:", flush=True)
        results.update(await polls_and_submissions(args))
        worst_status = min(s["requests_per_s"] for s in results["status"])
        results["meets_target"]["status_per_s"] = worst_status >= TARGET_STATUS_PER_S
        verdicts.append(f">= {TARGET_STATUS_PER_S:,} status/s on one core: {'met' if worst_status >= TARGET_STATUS_PER_S else 'NOT met'} (worst {worst_status:,.0f}/s)")
    if args.only in (None, "sockets"):
        print("WebSocket clients:", flush=True)
        results["sockets"] = ws = await sockets(args)
        ok = ws["finished_jobs"] >= TARGET_SOCKETS and ws["lag"]["p99_ms"] < TARGET_LAG_P99_MS
        results["meets_target"]["sockets"] = ok
        verdicts.append(f"{TARGET_SOCKETS:,} sockets with p99 event lag < {TARGET_LAG_P99_MS:.0f} ms: {'met' if ok else 'NOT met'} (p99 {ws['lag']['p99_ms']} ms)")
    path = write_results("gateway_load" if args.only is None else f"gateway_load_{args.only}", results)

    if "status" in results:
        rows = [[s["label"], f"{s['requests_per_s']:,.0f}/s", s["p50_ms"], s["p99_ms"], s["gateway_cpu_share"], s["non_2xx"] + s["socket_errors"]] for s in results["status"] + results["submissions"]]
        print()
        print(markdown_table([f"load ({args.connections} connections)", "rate", "p50 ms", "p99 ms", "gateway CPU (cores)", "failed"], rows))
    if "sockets" in results:
        ws = results["sockets"]
        print()
        print(markdown_table(
            ["sockets", "jobs finished", "live events", "queue updates", "lag p50 ms", "lag p99 ms", "lag max ms", "gateway RSS open / peak MiB"],
            [[ws["sockets"], ws["finished_jobs"], ws["events"], ws["queue_updates"], ws["lag"]["p50_ms"], ws["lag"]["p99_ms"], ws["lag"]["max_ms"], f"{ws['gateway_rss_mib']['sockets_open']:.0f} / {ws['gateway_rss_mib']['peak']:.0f}"]],
        ))
    print()
    print("targets: " + "; ".join(verdicts))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=positive, default=10.0, help="seconds per HTTP load run")
    parser.add_argument("--connections", type=whole(1), default=64, help="concurrent HTTP connections")
    parser.add_argument("--sockets", type=whole(1), default=1000, help="WebSocket clients")
    parser.add_argument("--ws-workers", type=whole(1), default=32, help="simulated workers during the socket run")
    parser.add_argument("--ws-timeout", type=positive, default=150.0, help="seconds the socket run may take")
    parser.add_argument("--only", choices=["http", "sockets"], help="run one half only (results go to gateway_load_<half>.json)")
    parser.add_argument("--ws-client", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.ws_client:
        asyncio.run(ws_client(parsed.ws_client))
        sys.exit(0)
    sys.exit(asyncio.run(main(parsed)))
