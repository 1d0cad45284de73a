"""Throughput of the worker pool as it grows: 1, 8, 32 and 64 simulated workers, each job a fixed
500 ms, as a share of the ideal (workers / 0.5 s).

For each level: a fresh nats-server and gateway; the queue is filled through the gateway's HTTP API
(enough jobs to keep every worker busy past the measured window); then the workers start as asyncio
tasks, 8 to a process (1, 1, 4 and 8 processes; `--per-process` changes it). Once all are up, the
`done` events (stamped by the workers) of a 10 s window give each worker's rate, (completions - 1) /
(last - first), and the pool's rate is their sum. The queue must still hold jobs when the window
closes, or the level is marked as starved.

  python bench/scale.py                 # about 1 minute on 2 cores
  python bench/scale.py --levels 1,8    # some levels only
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgpack  # noqa: E402
import nats  # noqa: E402

from common import SMALL_JOB, OtherLoad, RssSampler, counts, http_session, markdown_table, non_negative, open_stack, positive, whole, write_results  # noqa: E402
from gateway_load import submit_many  # noqa: E402

JOB_S = 0.5
TARGET_AT_64 = 0.95


def pool_rate(done: list[tuple[float, str]]) -> float:
    """Jobs per second of the pool: the sum over workers of (completions - 1) / (last - first) in the
    window, which does not depend on where in a job the window happens to open and close."""
    by_worker: dict[str, list[float]] = {}
    for ts, worker in done:
        by_worker.setdefault(worker, []).append(ts)
    rate = 0.0
    for stamps in by_worker.values():
        if len(stamps) >= 2:
            rate += (len(stamps) - 1) / (max(stamps) - min(stamps))
    return rate


async def level(workers: int, args: argparse.Namespace) -> dict:
    ideal_per_s = workers / JOB_S
    jobs = math.ceil(ideal_per_s * (args.window + args.margin))
    async with AsyncExitStack() as es:
        stack = await open_stack(es)
        done_at: list[tuple[float, str]] = []
        nc = await nats.connect(stack.nats.url)
        es.push_async_callback(nc.close)

        async def on_event(msg) -> None:
            event = msgpack.unpackb(msg.data)
            if event.get("type") == "done":
                done_at.append((event["ts"], event.get("worker", "")))

        await nc.subscribe("imagegen.events.*", cb=on_event)
        async with http_session() as http:
            t0 = time.monotonic()
            await submit_many(http, stack.url, jobs, SMALL_JOB, concurrency=32)
            fill_s = time.monotonic() - t0
        t0 = time.monotonic()
        await stack.start_workers(workers, fixed_s=JOB_S, per_process=args.per_process)
        start_s = time.monotonic() - t0
        await asyncio.sleep(args.settle)
        with RssSampler(stack.pids()) as rss, OtherLoad() as other:
            window_start = time.time()
            await asyncio.sleep(args.window)
            window_end = time.time()
        await asyncio.sleep(0.2)  # events stamped inside the window still in flight
        finished = len(done_at)
        await stack.stop_workers(timeout=0)
    in_window = [(ts, w) for ts, w in done_at if window_start <= ts < window_end]
    per_s = pool_rate(in_window)
    left = jobs - finished
    result = {
        "workers": workers,
        "worker_processes": math.ceil(workers / args.per_process),
        "jobs_queued": jobs,
        "queue_fill_s": round(fill_s, 1),
        "workers_start_s": round(start_s, 1),
        "window_s": args.window,
        "done_in_window": len(in_window),
        "done_in_window_per_s": round(len(in_window) / (window_end - window_start), 2),
        "workers_seen": len({w for _, w in in_window}),
        "jobs_per_s": round(per_s, 2),
        "ideal_per_s": ideal_per_s,
        "fraction_of_ideal": round(per_s / ideal_per_s, 4),
        "queue_left_after": left,
        "starved": left <= 0,
        "rss_peak_mib": {k: round(v, 1) for k, v in rss.peak.items()},
        "other_load_cores": other.cores,
    }
    print(f"  {workers:3d} workers: {per_s:7.2f} jobs/s of {ideal_per_s:.0f} ideal = {per_s / ideal_per_s:.1%}"
          f" (queue left {left}, other load {other.cores} cores)", flush=True)
    return result


async def main(args: argparse.Namespace) -> int:
    rows = []
    for n in args.levels:
        rows.append(await level(n, args))
    results = {
        "config": vars(args),
        "job": f"simulated engine, fixed {JOB_S * 1000:.0f} ms per job (steps=1, 64x64 JPEG)",
        "processes": f"nats-server, gateway process, workers as asyncio tasks {args.per_process} to a process, event counter in the benchmark process",
        "levels": rows,
        "targets": {"fraction_of_ideal_at_64": TARGET_AT_64},
    }
    at64 = next((r for r in rows if r["workers"] == 64), None)
    if at64 is not None:
        results["meets_target"] = at64["fraction_of_ideal"] >= TARGET_AT_64 and not at64["starved"]
    path = write_results("scale", results)
    print()
    print(markdown_table(
        ["workers", "processes", "jobs/s", "ideal jobs/s", "of ideal", "worker RSS peak MiB (per process)", "other load (cores)"],
        [[r["workers"], r["worker_processes"], r["jobs_per_s"], r["ideal_per_s"], f"{r['fraction_of_ideal']:.1%}" + (" (starved)" if r["starved"] else ""),
          ", ".join(f"{v:.0f}" for k, v in r["rss_peak_mib"].items() if k.startswith("workers")), r["other_load_cores"]] for r in rows],
    ))
    if at64 is not None:
        print(f"\ntarget >= {TARGET_AT_64:.0%} of ideal at 64 workers: {'met' if results['meets_target'] else 'NOT met'} ({at64['fraction_of_ideal']:.1%})")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=counts, default="1,8,32,64", help="worker counts, comma-separated")
    parser.add_argument("--window", type=positive, default=10.0, help="seconds counted per level")
    parser.add_argument("--settle", type=non_negative, default=1.0, help="seconds between all workers up and the window")
    parser.add_argument("--margin", type=non_negative, default=8.0, help="seconds of extra queued work beyond the window")
    parser.add_argument("--per-process", type=whole(1), default=8, help="workers per worker process")
    sys.exit(asyncio.run(main(parser.parse_args())))
