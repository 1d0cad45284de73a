"""Resident memory (RSS) of a gateway process and of simulated worker processes, idle and under load.

One gateway lives through every phase, so its last idle figure also shows what the loads left behind:
1. idle: the gateway, a process with one worker, a process with 32 workers (asyncio tasks).
2. jobs: 32 clients running submit -> WebSocket -> image for 10 s (zero-time engine), against the
   one-worker process, then against the 32-worker process.
3. status polls: wrk (or aiohttp) for 10 s over 1,000 queued jobs.
4. idle again, 5 s after the loads; then 5,000 more queued jobs, for the memory per job record
   (the gateway's view keeps every record in memory for the job TTL, 24 h by default).
5. 1,000 WebSocket clients following jobs (the socket run of gateway_load.py, its own gateway).

  python bench/memory.py                # about 1.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SMALL_JOB, OtherLoad, RssSampler, http_load, http_session, markdown_table, open_stack, positive, rss_mib, whole, write_results  # noqa: E402
from gateway_load import sockets, submit_many  # noqa: E402
from overhead import throughput  # noqa: E402


async def main(args: argparse.Namespace) -> int:
    rows: list[list] = []
    results: dict = {"config": vars(args)}
    other = OtherLoad().__enter__()
    async with AsyncExitStack() as es:
        stack = await open_stack(es)
        gw = stack.gateway.pid
        one = (await stack.start_workers(1))[0]
        many = (await stack.start_workers(32))[0]
        await asyncio.sleep(2.0)
        idle = {"gateway": rss_mib(gw), "worker process, 1 worker": rss_mib(one.pid), "worker process, 32 workers": rss_mib(many.pid)}
        results["idle_mib"] = {k: round(v, 1) for k, v in idle.items()}
        results["per_extra_worker_mib"] = round((idle["worker process, 32 workers"] - idle["worker process, 1 worker"]) / 31, 2)
        rows += [[name, "idle", f"{v:.0f}", "-"] for name, v in idle.items()]
        print("idle measured; jobs through 1 worker ...", flush=True)

        async with http_session() as http:
            await many.stop(timeout=5)
            stack.workers.remove(many)
            stack.roles.remove(many)
            with RssSampler({"gateway": gw, "worker": one.pid}) as rss:
                jobs1 = await throughput(http, stack.url, clients=args.clients, duration_s=args.duration)
            results["jobs_1_worker"] = {"jobs_per_s": jobs1["jobs_per_s"], "peak_mib": {k: round(v, 1) for k, v in rss.peak.items()}}
            rows += [["gateway", f"{args.clients} clients, 1 worker, {jobs1['jobs_per_s']:.0f} jobs/s", f"{rss.peak['gateway']:.0f}", f"+{rss.peak['gateway'] - idle['gateway']:.0f}"],
                     ["worker process, 1 worker", "the same", f"{rss.peak['worker']:.0f}", f"+{rss.peak['worker'] - idle['worker process, 1 worker']:.0f}"]]

            print("jobs through 32 workers ...", flush=True)
            await stack.stop_workers(timeout=5)
            many = (await stack.start_workers(32))[0]
            await asyncio.sleep(1.0)
            many_idle = rss_mib(many.pid)
            with RssSampler({"gateway": gw, "workers": many.pid}) as rss:
                jobs32 = await throughput(http, stack.url, clients=args.clients, duration_s=args.duration)
            results["jobs_32_workers"] = {"jobs_per_s": jobs32["jobs_per_s"], "peak_mib": {k: round(v, 1) for k, v in rss.peak.items()}}
            rows += [["gateway", f"{args.clients} clients, 32 workers, {jobs32['jobs_per_s']:.0f} jobs/s", f"{rss.peak['gateway']:.0f}", f"+{rss.peak['gateway'] - idle['gateway']:.0f}"],
                     ["worker process, 32 workers", "the same", f"{rss.peak['workers']:.0f}", f"+{rss.peak['workers'] - many_idle:.0f}"]]
            await stack.stop_workers(timeout=5)

            print("status polls ...", flush=True)
            queued = await submit_many(http, stack.url, 1000, SMALL_JOB)
            with RssSampler({"gateway": gw}) as rss:
                polls = await http_load(stack.url, paths=[f"/api/status?task_id={i}" for i in queued], connections=64, duration_s=args.duration, workdir=stack.workdir)
            results["status_polls"] = {"requests_per_s": polls["requests_per_s"], "peak_mib": round(rss.peak["gateway"], 1)}
            rows.append(["gateway", f"status polls, 1,000 queued, {polls['requests_per_s']:,.0f}/s", f"{rss.peak['gateway']:.0f}", f"+{rss.peak['gateway'] - idle['gateway']:.0f}"])

            await asyncio.sleep(5.0)
            after = rss_mib(gw)
            async with http.get(f"{stack.url}/v1/jobs") as r:
                held = len(await r.json())
            results["gateway_idle_after_mib"] = round(after, 1)
            rows.append(["gateway", f"idle, 5 s after the loads ({held:,} job records held)", f"{after:.0f}", f"+{after - idle['gateway']:.0f}"])

            print(f"{args.extra_jobs:,} more jobs ...", flush=True)
            await submit_many(http, stack.url, args.extra_jobs, SMALL_JOB)
            await asyncio.sleep(2.0)
            grown = rss_mib(gw)
            per_1000 = (grown - after) / args.extra_jobs * 1000
            results["gateway_mib_per_1000_jobs_held"] = round(per_1000, 2)
            rows.append(["gateway", f"{args.extra_jobs:,} more jobs queued ({held + args.extra_jobs:,} held)", f"{grown:.0f}", f"+{grown - idle['gateway']:.0f}"])

    print(f"{args.sockets:,} WebSocket clients ...", flush=True)
    ws = await sockets(argparse.Namespace(sockets=args.sockets, ws_workers=32, ws_timeout=150.0))
    results["sockets"] = {"sockets": args.sockets, "gateway_mib": ws["gateway_rss_mib"], "lag_p99_ms": ws["lag"]["p99_ms"]}
    g = ws["gateway_rss_mib"]
    rows.append(["gateway (its own)", f"{args.sockets:,} WebSocket clients open / while their jobs run", f"{g['sockets_open']:.0f} / {g['peak']:.0f}", f"+{g['sockets_open'] - g['before']:.0f} / +{g['peak'] - g['before']:.0f}"])
    other.__exit__(None, None, None)
    results["other_load_cores"] = other.cores
    results["rows"] = rows
    path = write_results("memory", results)
    print(markdown_table(["process", "state", "RSS MiB", "vs idle"], rows))
    print(f"\neach extra worker in a process: {results['per_extra_worker_mib']} MiB idle; each 1,000 job records the gateway holds"
          f" (its view keeps every record for the job TTL): {results['gateway_mib_per_1000_jobs_held']} MiB; other load on the machine: {other.cores} cores")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=positive, default=10.0, help="seconds per load")
    parser.add_argument("--clients", type=whole(1), default=32, help="concurrent job clients")
    parser.add_argument("--sockets", type=whole(1), default=1000, help="WebSocket clients")
    parser.add_argument("--extra-jobs", type=whole(1), default=5000, help="jobs queued at the end to measure memory per job record")
    sys.exit(asyncio.run(main(parser.parse_args())))
