"""What the event loop costs: the whole path, one job at a time, on uvloop and on asyncio's own loop.

Each round starts a fresh stack (nats-server, gateway, one simulated worker of zero time) on one loop,
runs 30 warm-up jobs and then `--jobs` jobs one at a time with `Prefer: wait` (as bench/overhead.py
does), measuring latency and each process's CPU per job; the loops take turns, so that a host whose
speed drifts weighs on both alike. The nats-server is the same program in both, so its CPU per job is
a yardstick of the host's speed at that moment: the gateway's and the worker's CPU are also reported
as multiples of it.

    python bench/event_loops.py [--rounds 3] [--jobs 300]     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import http_session, machine, markdown_table, open_stack, whole, write_results  # noqa: E402
from overhead import job_body, metered, run_job, sequential  # noqa: E402

LOOPS = ("uvloop", "asyncio")


async def one_round(loop: str, jobs: int) -> dict:
    os.environ["IMAGEGEN_EVENT_LOOP"] = loop  # the stack's processes run on it (bench/common.py)
    async with AsyncExitStack() as es:
        stack = await open_stack(es)
        await stack.start_workers(1, per_process=1)
        async with http_session() as http:
            for i in range(30):  # warm-up: connections, consumers, caches
                await run_job(http, stack.url, job_body(i))
            pids = {**stack.pids(), "clients": os.getpid()}
            result = await metered(pids, sequential(http, stack.url, jobs, wait="prefer"), lambda r: r["latency"]["n"])
    cpu = result["cpu_ms_per_job"]
    yardstick = cpu.get("nats-server") or float("nan")
    return {
        "p50_ms": result["latency"]["p50_ms"],
        "p99_ms": result["latency"]["p99_ms"],
        "errors": result["errors"],
        "cpu_ms_per_job": cpu,
        "cpu_per_nats_cpu": {"gateway": round(cpu["gateway"] / yardstick, 3), "worker": round(cpu["workers-0"] / yardstick, 3)},
    }


async def main(args: argparse.Namespace) -> int:
    rounds: dict[str, list[dict]] = {loop: [] for loop in LOOPS}
    for i in range(args.rounds):
        for loop in LOOPS:
            r = await one_round(loop, args.jobs)
            rounds[loop].append(r)
            print(f"round {i + 1} {loop}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, CPU ms per job {r['cpu_ms_per_job']}", flush=True)
    os.environ.pop("IMAGEGEN_EVENT_LOOP", None)
    summary = {
        loop: {
            "p50_ms_median": statistics.median(r["p50_ms"] for r in rs),
            "gateway_cpu_ms_median": statistics.median(r["cpu_ms_per_job"]["gateway"] for r in rs),
            "worker_cpu_ms_median": statistics.median(r["cpu_ms_per_job"]["workers-0"] for r in rs),
            "gateway_per_nats_median": statistics.median(r["cpu_per_nats_cpu"]["gateway"] for r in rs),
            "worker_per_nats_median": statistics.median(r["cpu_per_nats_cpu"]["worker"] for r in rs),
        }
        for loop, rs in rounds.items()
    }
    fast, slow = summary["uvloop"], summary["asyncio"]
    saved = {
        part: round(1 - fast[f"{part}_per_nats_median"] / slow[f"{part}_per_nats_median"], 3) for part in ("gateway", "worker")
    }
    path = write_results("event_loops", {"config": vars(args), "machine": {**machine(), "event_loop": "both, in turns"},
                                         "rounds": rounds, "summary": summary, "cpu_saved_by_uvloop": saved})
    rows = [
        [loop, s["p50_ms_median"], s["gateway_cpu_ms_median"], s["worker_cpu_ms_median"], s["gateway_per_nats_median"], s["worker_per_nats_median"]]
        for loop, s in summary.items()
    ]
    print(markdown_table(["loop", "p50 ms", "gateway CPU ms/job", "worker CPU ms/job", "gateway / nats-server CPU", "worker / nats-server CPU"], rows))
    print(f"uvloop saves {saved['gateway']:.1%} of the gateway's CPU per job and {saved['worker']:.1%} of the worker's "
          f"(medians of {args.rounds} rounds, measured against nats-server's CPU); results: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole(1), default=3, help="rounds; each runs both loops, in turns")
    parser.add_argument("--jobs", type=whole(1), default=300, help="jobs per loop and round")
    sys.exit(asyncio.run(main(parser.parse_args())))
