"""The gateway's ETA forecast against an exact simulation of bench/eta.py's workload: no timing noise.

The forecast is the gateway's own (`gateway.state.forecast.forecast` over a real `QueueView`); only the
queue is simulated: jobs of bench/eta.py's mix arrive at random (Poisson) at a share of the workers'
capacity, each worker takes them in the order `schemas.take_order` gives and runs each for exactly the
time its speed model says, with no overhead between jobs. Each job's ETA is taken as it is submitted
and compared with its time to done.

It answers three questions bench/eta.py cannot in its minutes: how far the 90th percentile of one
run of the benchmark's size moves from seed to seed with the same code (the workload alone), what
the forecast's errors are over many thousands of jobs, and how far any forecast could do better.

For the last, an oracle: at each measured job's submission it knows the exact queue, each worker's
time until free and fairness count, and the true arrival process, and plays `--futures` futures of
arrivals from that state to the job's end under the same take order. It answers the futures' median
(as many jobs done before their ETA as after), or the value with the least expected error relative
to the time to done (their median weighted by 1 / time). Both are compared with the gateway's
forecast on the same jobs.

    python bench/eta_sim.py [--seeds 40] [--jobs 200] [--long-jobs 5000] [--long-seeds 8] [--workers 1]
                            [--oracle-seeds 10] [--oracle-jobs 300] [--futures 100]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import positive, whole  # noqa: E402
from eta import FIXED_S, REFINER_FIXED_S, REFINER_STEP_FACTOR, STEP_S, STEP_S_PER_MPX, job_seconds, p90, workload  # noqa: E402
from gateway.state.forecast import forecast  # noqa: E402
from gateway.state.queue_view import QueueView  # noqa: E402
from schemas.names import TIERS, Tier  # noqa: E402
from schemas.status import JobState, JobStatus  # noqa: E402
from schemas.take_order import next_take  # noqa: E402
from schemas.workers import DEFAULT_FAIRNESS, SpeedModel, WorkerInfo  # noqa: E402

TARGET_MEDIAN, TARGET_P90 = 0.15, 0.35


def simulate(
    seed: int, jobs: int, *, workers: int, load: float, fairness: int, warmup_s: float, futures: int = 0
) -> list[tuple[str, float, float]] | list[tuple[str, float, float, float, float]]:
    """(tier, absolute error relative to the time to done, time to done) of `jobs` jobs submitted after
    `warmup_s`. With `futures`, each tuple also holds the oracle's two answers' errors (see `Oracle`)."""
    rng = random.Random(seed)
    view = QueueView(worker_ttl_s=float("inf"))
    speed = SpeedModel(
        fixed_s=FIXED_S, step_s=STEP_S, step_s_per_mpx=STEP_S_PER_MPX, decode_s_per_mpx=0.0,
        refiner_step_ratio=REFINER_STEP_FACTOR, refiner_fixed_s=REFINER_FIXED_S,
    )
    names = [f"worker-{i}" for i in range(workers)]
    for name in names:
        view.workers[name] = WorkerInfo(
            worker_id=name, model="simulated", default_steps=30, default_guidance=5.0, speed=speed, fairness=fairness
        )
    rate = load * workers / statistics.mean(job_seconds(j) for j in workload(1000, random.Random(0)))
    counts = dict.fromkeys(names, 0)  # each worker's own fairness count
    idle = list(names)
    ends: list[tuple[float, str, str]] = []  # (when, worker, job id) of the running jobs
    requests: dict[str, dict] = {}
    predicted: dict[str, float] = {}
    errors: list[tuple[str, float, float]] = []
    oracle = Oracle(rate, fairness, random.Random(seed + 1_000_000), futures) if futures else None
    answers: dict[str, tuple[float, float]] = {}

    def take(worker: str, now: float) -> bool:
        waiting = [tier for tier in TIERS if view.queued[tier]]
        if not waiting:
            counts[worker] = 0
            return False
        tier, counts[worker] = next_take(waiting, counts[worker], fairness)
        job_id = view.queued[tier][0][1]
        running = view.jobs[job_id].model_copy()
        running.state, running.worker, running.attempt, running.started_at = JobState.RUNNING, worker, 1, now
        view.workers[worker].job_id = job_id
        view.apply(running, 2)
        heapq.heappush(ends, (now + job_seconds(requests[job_id]), worker, job_id))
        return True

    arrival = 0.0  # the first job at once, then random gaps: bench/eta.py's draws, in its order
    for i in range(10_000_000):
        if ends and ends[0][0] <= arrival:
            now, worker, job_id = heapq.heappop(ends)
            done = view.jobs[job_id].model_copy()
            done.state, done.finished_at = JobState.DONE, now
            view.workers[worker].job_id = None
            view.apply(done, 3)
            if job_id in predicted:
                actual = now - view.jobs[job_id].submitted_at
                error = (view.jobs[job_id].tier.value, abs(predicted.pop(job_id) - actual) / actual, actual)
                if oracle is not None:
                    error += tuple(abs(answer - actual) / actual for answer in answers.pop(job_id))
                errors.append(error)
                if len(errors) == jobs:
                    return errors
            if not take(worker, now):
                idle.append(worker)
            continue
        now = arrival
        [request] = workload(1, rng)
        job_id = f"job-{i:08d}"
        requests[job_id] = request
        status = JobStatus(job_id=job_id, tier=Tier(request["tier"]), request=request, submitted_at=now)
        view.apply(status, 1)
        if now >= warmup_s and len(predicted) + len(errors) < jobs:
            predicted[job_id] = forecast(view, status, now=now)
            if oracle is not None:
                queues = [[(queued_id, job_seconds(requests[queued_id])) for _, queued_id in view.queued[tier]] for tier in TIERS]
                free = [max(now, end) for end, _, _ in ends] + [now] * len(idle)
                skipped = [counts[name] for _, name, _ in ends] + [counts[name] for name in idle]
                answers[job_id] = oracle.answers(queues, free, skipped, now, job_id)
        if idle:
            take(idle.pop(0), now)
        arrival = now + rng.expovariate(rate)
    raise AssertionError("the simulation ran out of arrivals")


class Oracle:
    """Plays futures of the queue from a submission: the jobs queued now (their exact costs), each
    worker's time until free and fairness count, and arrivals of the workload's mix at the true rate."""

    def __init__(self, rate: float, fairness: int, rng: random.Random, futures: int):
        self.rate, self.fairness, self.rng, self.futures = rate, fairness, rng, futures

    def answers(self, queues: list[list[tuple[str, float]]], free: list[float], skipped: list[int], now: float, job_id: str) -> tuple[float, float]:
        """The futures' median time to done of `job_id`, and their median weighted by 1 / time."""
        times = sorted(self.play(queues, free, skipped, now, job_id) for _ in range(self.futures))
        weights = [1.0 / t for t in times]
        half, total = sum(weights) / 2, 0.0
        for t, weight in zip(times, weights):
            total += weight
            if total >= half:
                return times[len(times) // 2], t
        return times[len(times) // 2], times[-1]

    def play(self, queues: list[list[tuple[str, float]]], free: list[float], skipped: list[int], now: float, job_id: str) -> float:
        queues = [list(queue) for queue in queues]
        heads = [0] * len(queues)
        skipped = list(skipped)
        workers = [(t, i) for i, t in enumerate(free)]
        heapq.heapify(workers)
        arrival = now + self.rng.expovariate(self.rate)
        while True:
            at, i = heapq.heappop(workers)
            while arrival <= at:
                [request] = workload(1, self.rng)
                queues[TIERS.index(Tier(request["tier"]))].append(("", job_seconds(request)))
                arrival += self.rng.expovariate(self.rate)
            waiting = [tier for k, tier in enumerate(TIERS) if heads[k] < len(queues[k])]
            if not waiting:  # nothing queued: it counts from zero and takes the next arrival
                skipped[i] = 0
                heapq.heappush(workers, (arrival, i))
                continue
            tier, skipped[i] = next_take(waiting, skipped[i], self.fairness)
            k = TIERS.index(tier)
            taken, cost = queues[k][heads[k]]
            heads[k] += 1
            if taken == job_id:
                return at + cost - now
            heapq.heappush(workers, (at + cost, i))


def errors_summary(errors: list[tuple[str, float, float]]) -> dict:
    summary = {"jobs": len(errors), "median_abs_error": statistics.median(e for _, e, _ in errors), "p90_abs_error": p90([e for _, e, _ in errors])}
    for tier in ("high", "normal", "low"):
        of_tier = [(e, t) for name, e, t in errors if name == tier]
        if of_tier:
            summary[tier] = {
                "jobs": len(of_tier),
                "median_abs_error": statistics.median(e for e, _ in of_tier),
                "p90_abs_error": p90([e for e, _ in of_tier]),
                "mean_time_to_done_s": statistics.mean(t for _, t in of_tier),
                "p90_time_to_done_s": p90([t for _, t in of_tier]),
            }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=whole(1), default=40, help="runs of the benchmark's size, one per seed")
    parser.add_argument("--jobs", type=whole(1), default=200, help="jobs measured per run (bench/eta.py: 200 with 1 worker)")
    parser.add_argument("--warmup", type=positive, default=30.0, help="seconds of arrivals before the measured jobs")
    parser.add_argument("--long-seeds", type=whole(1), default=8, help="long runs, pooled")
    parser.add_argument("--long-jobs", type=whole(1), default=5000, help="jobs measured per long run")
    parser.add_argument("--workers", type=whole(1), default=1)
    parser.add_argument("--load", type=positive, default=0.85, help="arrivals as a share of the workers' capacity")
    parser.add_argument("--fairness", type=whole(1), default=DEFAULT_FAIRNESS, help="the workers' --fairness")
    parser.add_argument("--oracle-seeds", type=whole(0), default=10, help="runs compared with the oracle (0: none)")
    parser.add_argument("--oracle-jobs", type=whole(1), default=300, help="jobs measured per oracle run")
    parser.add_argument("--futures", type=whole(1), default=100, help="futures the oracle plays per job")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eta_sim.json"))
    args = parser.parse_args()
    if args.load >= 1.0:
        parser.error(f"--load: must be below 1 (a queue past capacity grows without end), got {args.load}")
    started = time.perf_counter()
    settings = dict(workers=args.workers, load=args.load, fairness=args.fairness)
    runs = [errors_summary(simulate(seed, args.jobs, warmup_s=args.warmup, **settings)) for seed in range(1, args.seeds + 1)]
    per_run = sorted(run["p90_abs_error"] for run in runs)
    pooled: list[tuple[str, float, float]] = []
    for seed in range(1, args.long_seeds + 1):
        pooled += simulate(1000 + seed, args.long_jobs, warmup_s=300.0, **settings)
    long = errors_summary(pooled)
    against: list[tuple] = []
    for seed in range(1, args.oracle_seeds + 1):
        against += simulate(2000 + seed, args.oracle_jobs, warmup_s=300.0, futures=args.futures, **settings)
    results = {
        "benchmark": "eta_sim",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "runs_of_benchmark_size": {
            "p90_abs_error": {
                "min": per_run[0], "q10": per_run[int(0.1 * (len(per_run) - 1))], "median": statistics.median(per_run),
                "q90": p90(per_run), "max": per_run[-1],
            },
            "runs_meeting_p90_target": sum(p <= TARGET_P90 for p in per_run),
            "runs": len(per_run),
            "median_abs_error_max": max(run["median_abs_error"] for run in runs),
        },
        "long_runs_pooled": long,
        "against_oracle": {
            "jobs": len(against),
            "forecast": {"median_abs_error": statistics.median(e[1] for e in against), "p90_abs_error": p90([e[1] for e in against])},
            "oracle_median": {"median_abs_error": statistics.median(e[3] for e in against), "p90_abs_error": p90([e[3] for e in against])},
            "oracle_least_relative_error": {"median_abs_error": statistics.median(e[4] for e in against), "p90_abs_error": p90([e[4] for e in against])},
        } if against else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    spread = results["runs_of_benchmark_size"]
    q = spread["p90_abs_error"]
    print(f"{args.workers} worker(s), {args.load:.0%} load, fairness {args.fairness}")
    print(
        f"runs of {args.jobs} jobs, {args.seeds} seeds: p90 abs error min {q['min']:.1%}, q10 {q['q10']:.1%}, "
        f"median {q['median']:.1%}, q90 {q['q90']:.1%}, max {q['max']:.1%}; "
        f"p90 <= {TARGET_P90:.0%} in {spread['runs_meeting_p90_target']} of {spread['runs']}"
    )
    tiers = ", ".join(
        f"{tier} {long[tier]['median_abs_error']:.1%} / {long[tier]['p90_abs_error']:.1%}" for tier in ("high", "normal", "low") if tier in long
    )
    print(
        f"{args.long_seeds} runs of {args.long_jobs} jobs pooled: median {long['median_abs_error']:.1%}, "
        f"p90 {long['p90_abs_error']:.1%} (median / p90 by tier: {tiers})"
    )
    waits = ", ".join(
        f"{tier} {long[tier]['mean_time_to_done_s']:.2f} / {long[tier]['p90_time_to_done_s']:.2f} s" for tier in ("high", "normal", "low") if tier in long
    )
    print(f"time to done, mean / p90 by tier: {waits}")
    if against:
        o = results["against_oracle"]
        print(
            f"the same {o['jobs']} jobs, p90 abs error: this forecast {o['forecast']['p90_abs_error']:.1%}, "
            f"oracle ({args.futures} futures per job) answering their median {o['oracle_median']['p90_abs_error']:.1%}, "
            f"their least relative error {o['oracle_least_relative_error']['p90_abs_error']:.1%}"
        )
    print(f"results: {args.out} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
