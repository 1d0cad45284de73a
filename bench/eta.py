"""ETA accuracy at submission: how far `expected_time_seconds` is from the real time to done.

Simulated engines (a fixed cost, a cost per step and per megapixel per step, the refiner's steps 1.5
times a base step's after a 40 ms hand-over) on a real nats-server,
a real gateway and in-process workers; a mixed workload of sizes, steps, refiner on/off and priority
tiers arriving at random at 85 % of the capacity the workers measure, with 1 and 4 workers.

    python bench/eta.py [--jobs 200] [--seed 1] [--runs 3] [--fairness 5] [--levels 1,4] [--out bench/results/eta.json]

Each level runs `--runs` times, with seeds `--seed`, `--seed` + 1, ..., each with a fresh gateway and
workers, and its errors are reported per run and pooled. One run's 90th percentile moves with the draw
of its arrivals (a burst of higher-tier jobs misleads the ETAs of every lower-tier job waiting then,
together), so a figure for the forecast wants more than one run.

`--fairness` is the workers' setting of that name: how many jobs in a row they take from higher tiers
while a lower one waits. It trades the higher tiers' waits for the lower tiers' (the mean time to done
per tier is reported with the errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import counts, non_negative, whole  # noqa: E402
from gateway.settings import GatewaySettings  # noqa: E402
from gpu_worker.settings import WorkerSettings  # noqa: E402
from schemas.request import refiner_steps  # noqa: E402
from schemas.workers import DEFAULT_FAIRNESS  # noqa: E402
from imagegen import runtime  # noqa: E402
from imagegen.embedded_nats import EmbeddedNats, free_port  # noqa: E402

SIZES = [(512, 512), (768, 768), (1024, 1024), (1152, 896), (896, 1152)]
STEP_S, STEP_S_PER_MPX, FIXED_S = 0.004, 0.02, 0.03
REFINER_STEP_FACTOR, REFINER_FIXED_S = 1.5, 0.04  # the refiner's steps take longer, after a hand-over


def workload(n: int, rng: random.Random) -> list[dict]:
    jobs = []
    for i in range(n):
        width, height = rng.choice(SIZES)
        jobs.append(
            {
                "prompt": f"job {i}",
                "width": width,
                "height": height,
                "steps": rng.randint(10, 40),
                "use_refiner": rng.random() < 0.3,
                "tier": rng.choices(["high", "normal", "low"], [0.2, 0.6, 0.2])[0],
                "seed": i,
            }
        )
    return jobs


def p90(values: list[float]) -> float:
    """The 90th percentile as this benchmark reports it: the value at 90 % of the way through the sorted list."""
    values = sorted(values)
    return values[int(0.9 * (len(values) - 1))]


def on_refiner(job: dict) -> int:
    """The steps the engine runs on the refiner (the last ones, past the default split)."""
    return refiner_steps(job["steps"], None) if job["use_refiner"] else 0


def job_seconds(job: dict) -> float:
    """What the simulated engine takes for `job`."""
    per_step = STEP_S + STEP_S_PER_MPX * job["width"] * job["height"] / 1e6
    refiner = on_refiner(job)
    refiner_s = REFINER_FIXED_S + refiner * per_step * REFINER_STEP_FACTOR if refiner else 0.0
    return FIXED_S + (job["steps"] - refiner) * per_step + refiner_s


def measured_capacity(workers: list) -> float:
    """Jobs per second the workers can take, by the speed each measured in its warm-up (the engine's
    nominal time plus what the worker spends around it: encoding, events, records)."""
    sample = workload(1000, random.Random(0))
    return sum(
        1.0 / statistics.mean(
            worker.meter.model.estimate(
                width=j["width"], height=j["height"], steps=j["steps"] - on_refiner(j), refiner_steps=on_refiner(j)
            )
            for j in sample
        )
        for worker in workers
    )


async def run_level(
    nats_url: str, workers: int, measured: int, rng: random.Random, *, warmup_s: float, fairness: int
) -> dict:
    """Jobs arrive at random at 85 % of the workers' measured capacity, without a pause: the first
    `warmup_s` of arrivals fill the gateway's arrival history, the next `measured` jobs are measured,
    and arrivals go on until every measured job is done (a service under steady load never stops
    receiving work just as a measured job waits)."""
    settings = dict(
        nats_url=nats_url, model="simulated", sim_step_s=STEP_S, sim_step_s_per_mpx=STEP_S_PER_MPX,
        sim_fixed_s=FIXED_S, sim_refiner_step_factor=REFINER_STEP_FACTOR, sim_refiner_fixed_s=REFINER_FIXED_S, preview_every=0, heartbeat_s=1.0, fairness=fairness,
    )
    started = [await runtime.start_worker(WorkerSettings(**settings)) for _ in range(workers)]
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=nats_url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    capacity = measured_capacity([worker for worker, _ in started])
    predicted: dict[str, float] = {}
    submitted: dict[str, float] = {}
    tiers: dict[str, str] = {}
    arrivals: dict[str, int] = {}  # the job's place among all arrivals, warm-up included
    actual: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(1.5)  # the gateway sees every worker's registry entry
            began = time.monotonic()
            deadline = began + warmup_s + 10 * measured / capacity + 120
            checked = 0.0
            for i in range(100_000):
                [job] = workload(1, rng)
                job["prompt"] = f"job {i}"
                async with http.post(f"{url}/api/generate", json=job) as r:
                    body = await r.json()
                warm = time.monotonic() - began >= warmup_s
                if warm and len(predicted) < measured:
                    submitted[body["task_id"]] = time.time()
                    predicted[body["task_id"]] = body["expected_time_seconds"]
                    tiers[body["task_id"]] = job["tier"]
                    arrivals[body["task_id"]] = i
                if len(predicted) == measured and time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    async with http.get(f"{url}/api/tasks") as r:
                        for task in await r.json():
                            if task["end_time"] and task["task_id"] in submitted:
                                actual[task["task_id"]] = task["end_time"] - submitted[task["task_id"]]
                    if len(actual) == measured or time.monotonic() > deadline:
                        break
                await asyncio.sleep(rng.expovariate(capacity * 0.85))
            await http.get(f"{url}/api/clear")
    finally:
        await gateway.stop()
        for worker, task in started:
            worker.stop()
            await task
            await worker.close()
    jobs = [
        {"arrival": arrivals[j], "tier": tiers[j], "eta_s": predicted[j], "actual_s": actual[j], "abs_error": abs(predicted[j] - actual[j]) / actual[j]}
        for j in actual
    ]
    return {
        "workers": workers,
        "fairness": fairness,
        "jobs": measured,
        **summary(jobs),
        "arrivals_per_s": 0.85 * capacity,
        "measured_capacity_jobs_per_s": capacity,
        "nominal_capacity_jobs_per_s": workers / statistics.mean(job_seconds(j) for j in workload(1000, random.Random(0))),
        "errors": jobs,
    }


def summary(jobs: list[dict]) -> dict:
    """The errors of `jobs` (each with its tier, abs_error and actual_s), all together and by tier."""
    by_tier = {}
    for tier in ("high", "normal", "low"):
        of_tier = [job for job in jobs if job["tier"] == tier]
        if of_tier:
            by_tier[tier] = {
                "jobs": len(of_tier),
                "median_abs_error": statistics.median(job["abs_error"] for job in of_tier),
                "p90_abs_error": p90([job["abs_error"] for job in of_tier]),
                "mean_actual_s": statistics.mean(job["actual_s"] for job in of_tier),
            }
    return {
        "completed": len(jobs),
        "median_abs_error": statistics.median(job["abs_error"] for job in jobs),
        "p90_abs_error": p90([job["abs_error"] for job in jobs]),
        "mean_actual_s": statistics.mean(job["actual_s"] for job in jobs),
        "by_tier": by_tier,
    }


def pooled(runs: list[dict]) -> dict:
    """One level's runs as one sample of jobs."""
    return {
        "workers": runs[0]["workers"],
        "fairness": runs[0]["fairness"],
        "runs": len(runs),
        "jobs": sum(run["jobs"] for run in runs),
        **summary([job for run in runs for job in run["errors"]]),
    }


def results_json(results: dict) -> str:
    """Indented JSON with each job's errors on one line."""
    text = json.dumps(results, indent=2)
    return re.sub(r"\{\n\s+(\"arrival\"|\"tier\")[^{}]*?\}", lambda m: " ".join(m.group(0).split()), text)


def row(label: str, r: dict) -> str:
    tiers = " | ".join(
        f"{t['median_abs_error']:.1%} / {t['p90_abs_error']:.1%}" if (t := r["by_tier"].get(tier)) else "-"
        for tier in ("high", "normal", "low")
    )
    means = " / ".join(f"{t['mean_actual_s']:.2f}" if (t := r["by_tier"].get(tier)) else "-" for tier in ("high", "normal", "low"))
    return (
        f"| {r['workers']} | {label} | {r['completed']}/{r['jobs']} | {r['median_abs_error']:.1%} | {r['p90_abs_error']:.1%} "
        f"| {tiers} | {r['mean_actual_s']:.2f} s | {means} s |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=whole(1), default=200, help="jobs measured with 1 worker (twice as many with 4)")
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed")
    parser.add_argument("--runs", type=whole(1), default=3, help="runs per level, pooled")
    parser.add_argument("--fairness", type=whole(1), default=DEFAULT_FAIRNESS, help="the workers' --fairness")
    parser.add_argument("--levels", type=counts, default="1,4", help="worker counts, comma-separated")
    parser.add_argument("--warmup", type=non_negative, default=30.0, help="seconds of unmeasured arrivals first")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eta.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [args.seed + k for k in range(args.runs)]
    levels = []
    with tempfile.TemporaryDirectory() as store:
        server = EmbeddedNats(store_dir=Path(store), port=free_port()).start()
        try:
            for workers in args.levels:
                measured = args.jobs * (1 if workers == 1 else 2)
                runs = []
                for seed in seeds:
                    run = await run_level(
                        server.url, workers, measured, random.Random(seed), warmup_s=args.warmup, fairness=args.fairness
                    )
                    runs.append({"seed": seed, **run})
                levels.append({"pooled": pooled(runs), "runs": runs})
        finally:
            server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(results_json({"benchmark": "eta", "seeds": seeds, "fairness": args.fairness, "levels": levels}))
    print("| workers | seed | jobs | median abs error | p90 abs error | p50 / p90 high | p50 / p90 normal | p50 / p90 low | mean time to done | high / normal / low |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for level in levels:
        for run in level["runs"]:
            print(row(str(run["seed"]), run))
        if len(level["runs"]) > 1:
            print(row("pooled", level["pooled"]))


if __name__ == "__main__":
    asyncio.run(main())
