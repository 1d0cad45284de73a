"""When will a job be done? A list-scheduling forecast over the live workers' measured speeds.

Each live worker is free after its running job's remaining time; the queued jobs ahead go one by one
to whichever worker is free first, in the order workers take them (higher tiers first, older ones
first within a tier, and a lower tier's turn after a worker's run of higher-tier takes: see
schemas.take_order), each costing what that worker's speed model says for its size, steps and
refiner. The job's ETA is when it would end in that plan, its wait stretched by the higher-tier work
expected to arrive meanwhile, but never past its turn. Unlike a pixels-only average, this counts
steps, size, refiner, priority tiers and workers.

The stretch: a job that would start after W seconds of work ahead of it now also waits for every
higher-tier job that arrives before it starts, and for those that arrive meanwhile, and so on; its wait
is the time the pool takes to catch up with W plus that stream. With the stream's share of the pool
(`load`, from the last minute's arrivals) the wait is W / (1 - load) on average, but it is skewed: most
of the time a little arrives and the wait stays near W, now and then a burst makes it several times
longer. Its variance is W * v / (1 - load)^3, v being the sum of the arriving jobs' squared costs per
second (divided by the number of workers squared). The forecast takes a lognormal with that mean and
variance, and answers mean / (1 + variance / mean^2), never less than W. That lies between the
lognormal's median, mean / sqrt(1 + variance / mean^2) (as many jobs finish before their ETA as after
it), and mean / (1 + variance / mean^2)^1.5, the value with the least expected error relative to the
wait (an ETA 10 s off is worse for a 5 s wait than for a 50 s one): their geometric mean. The mean
itself would overshoot most jobs to cover the few bursts, by a factor that grows with the higher-tier
load and shrinks as W grows (over a long wait, arrivals average out).

The turn: however much higher-tier work arrives, a lower-tier job's turn comes once its worker has
taken `fairness` higher-tier jobs in a row. A second plan, in which the higher tiers never run dry
(past their queued jobs come more, each of their recent mean cost), gives the latest start that
allows; the stretched wait is cut there.
"""

from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass
from typing import Iterator

from pydantic import ValidationError

from gateway.state.queue_view import QueueView
from schemas.take_order import next_take
from schemas.names import TIERS, Tier
from schemas.plan import expand, sizes, stage_parts
from schemas.request import GenerateRequest, refiner_steps, steps_run
from schemas.status import JobState, JobStatus
from schemas.workers import SpeedModel, WorkerInfo

ARRIVAL_WINDOW_S = 60.0
MAX_LOAD = 0.8
FALLBACK = WorkerInfo(worker_id="none", model="", default_steps=30, default_guidance=5.0)


def steps_planned(status: JobStatus, worker: WorkerInfo) -> tuple[int, int]:
    """(base steps, refiner steps) the job runs: the refiner takes the steps past the split, as the
    engines hand them over (none when the split leaves either model no step)."""
    request = status.request
    steps = request.get("steps") or worker.default_steps
    if status.init_image is not None:  # image-to-image runs only the strength's share of the steps
        steps = steps_run(steps, request.get("strength") or 1.0)
    refiner = refiner_steps(steps, request.get("refiner_split")) if request.get("use_refiner") else 0
    return steps - refiner, refiner


def plan_cost(status: JobStatus, worker: WorkerInfo, speed: SpeedModel) -> float | None:
    """Seconds a job with a plan (stages, hires, controlnet) takes, each stage costed at its own size; None
    for a one-pass job."""
    request = status.request
    if not any(request.get(name) for name in ("stages", "hires", "controlnet")):
        return None
    try:
        parsed = GenerateRequest.model_validate(request)
    except ValidationError:
        return None
    steps = parsed.steps or worker.default_steps
    stages = expand(parsed, default_steps=steps)
    from_image = status.init_image is not None
    parts = stage_parts(stages, parsed.width, parsed.height, steps, from_image=from_image, strength=parsed.strength)
    width, height = sizes(stages, parsed.width, parsed.height)[-1]
    return speed.plan_left_s(parts, step=0, final_mpx=width * height / 1e6)


def job_cost(status: JobStatus, worker: WorkerInfo, speed: SpeedModel | None = None) -> float:
    request = status.request
    planned = plan_cost(status, worker, speed or worker.speed)
    if planned is not None:
        return planned
    base, refiner = steps_planned(status, worker)
    return (speed or worker.speed).estimate(
        width=request.get("width", 1024), height=request.get("height", 1024), steps=base, refiner_steps=refiner
    )


def remaining(status: JobStatus, worker: WorkerInfo, now: float) -> float:
    """Seconds left for a running job: from its measured base step rate once the worker reported one
    (the refiner's steps, still to come or under way, at the worker's measured ratio to it), else from
    the worker's speed model."""
    if status.step_s is not None and status.step_at is not None and status.total_steps:
        request = status.request
        mpx = request.get("width", 1024) * request.get("height", 1024) / 1e6
        _, refiner = steps_planned(status, worker)
        refiner = refiner if refiner < status.total_steps else 0
        left = worker.speed.left_s(step=status.step, total=status.total_steps, refiner_steps=refiner, step_s=status.step_s, mpx=mpx)
        return max(0.0, left - (now - status.step_at))
    elapsed = max(0.0, now - status.started_at) if status.started_at is not None else 0.0
    return max(0.0, job_cost(status, worker) - elapsed)


def forecast(view: QueueView, status: JobStatus, *, now: float | None = None) -> float | None:
    """Seconds until `status`'s job is expected done; None once it is final."""
    if status.state.final:
        return None
    now = time.time() if now is None else now
    workers = pool(view)
    if status.state is JobState.RUNNING:
        by_id = {w.worker_id: w for w in workers}
        return remaining(status, by_id.get(status.worker or "", workers[0]), now)
    queued = view.queued
    key = (status.submitted_at, status.job_id)
    queue = queued[status.tier]
    i = bisect.bisect_left(queue, key)
    if i == len(queue) or queue[i] != key:  # not in the view's queue (yet): placed as if it were
        queued = {**queued, status.tier: [*queue[:i], key, *queue[i:]]}
    stretch = _tier_stretch(view, status.tier, workers, now)
    start, cost = _placed(Plan(view, workers, now), queued, status)
    bounding = stretch.bounding_plan(view, workers, now, status.tier)
    bound = _placed(bounding, queued, status)[0] if bounding is not None else None
    return stretch.wait(start, bound) + cost


def _placed(plan: Plan, queued: dict[Tier, list[tuple[float, str]]], status: JobStatus) -> tuple[float, float]:
    """(start, cost) of `status`'s job in the plan."""
    for job, start, cost in plan.takes(queued, extra=status):
        if job.job_id == status.job_id:
            return start, cost
    raise AssertionError("a queued job is always taken")


class Plan:
    """The queued jobs in the order the workers take them (schemas.take_order): each goes to the
    worker free first, after the running jobs' remaining time, each costing what that worker's speed
    model says. `takes()` yields (job, seconds until it starts, its cost); afterwards `free` holds when
    each worker is free again, `counts` each worker's fairness count, `last` the job taken last.

    With `endless` set, the tiers above it never run dry: past their queued jobs come more, each costing
    `endless_cost`. A job of tier `endless` cannot start later in that plan than its turn comes (the
    fairness rule): a bound on its wait however much higher-tier work arrives."""

    def __init__(self, view: QueueView, workers: list[WorkerInfo], now: float, *,
                 endless: Tier | None = None, endless_cost: float = 0.0):
        self.view = view
        self.workers = workers
        self.endless = TIERS[: endless.rank] if endless is not None else ()
        self.endless_cost = endless_cost
        self.free = _free_at(view, workers, now)
        self.counts = [view.takes.of(w.worker_id) for w in workers]
        self.last: JobStatus | None = None

    def takes(self, queued: dict[Tier, list[tuple[float, str]]] | None = None, *,
              extra: JobStatus | None = None) -> Iterator[tuple[JobStatus, float, float]]:
        """Takes the jobs `queued` (the view's queue by default; `extra` stands for a job the view lacks)."""
        queued = self.view.queued if queued is None else queued
        heads = {tier: 0 for tier in TIERS}
        left = [tier for tier in TIERS if queued.get(tier)]  # tiers with queued jobs not taken yet
        waiting = [tier for tier in TIERS if tier in left or tier in self.endless]
        jobs, free, counts, workers = self.view.jobs, self.free, self.counts, self.workers
        finite = sum(tier not in self.endless for tier in left)
        while finite:
            start, i = free[0]
            worker = workers[i]
            tier, count = next_take(waiting, counts[i], worker.fairness)
            if tier not in left:  # one more of an endless tier
                counts[i] = count
                heapq.heapreplace(free, (start + self.endless_cost, i))
                continue
            queue = queued[tier]
            job_id = queue[heads[tier]][1]
            heads[tier] += 1
            if heads[tier] == len(queue):
                left.remove(tier)
                if tier not in self.endless:
                    waiting.remove(tier)
                    finite -= 1
            job = extra if extra is not None and job_id == extra.job_id else jobs.get(job_id)
            if job is None:  # its record went meanwhile: no take
                continue
            counts[i] = count
            cost = job_cost(job, worker)
            heapq.heapreplace(free, (start + cost, i))
            self.last = job
            yield job, start, cost

    def append(self, job: JobStatus) -> tuple[float, float]:
        """(start, cost) of a job queued after every job taken so far, of the tier taken last (then it
        changes no earlier take)."""
        for _, start, cost in self.takes({job.tier: [(job.submitted_at, job.job_id)]}, extra=job):
            return start, cost
        raise AssertionError("a queued job is always taken")


@dataclass(frozen=True)
class Stretch:
    """The higher-tier work that arrives while a job waits: `load`, its share of the pool, `spread`,
    its squared seconds per second per worker squared (how bursty it is), and `mean_cost`, the mean
    seconds of one of its jobs."""

    load: float = 0.0
    spread: float = 0.0
    mean_cost: float = 0.0

    def wait(self, ahead_s: float, bound_s: float | None = None) -> float:
        """The expected wait of a job that the pool reaches after `ahead_s` of work queued now: the
        lognormal's mean / (1 + squared coefficient of variation) (see the module's notes), and never
        longer than `bound_s`, when its turn comes however much higher-tier work arrives."""
        if ahead_s <= 0.0:
            return 0.0
        mean = ahead_s / (1.0 - self.load)
        wait = mean / (1.0 + self.spread / (ahead_s * (1.0 - self.load)))
        if bound_s is not None:
            wait = min(wait, bound_s)
        return max(ahead_s, wait)

    def bounding_plan(self, view: QueueView, workers: list[WorkerInfo], now: float, tier: Tier) -> Plan | None:
        """The plan whose start of a `tier` job bounds its wait, when higher-tier work arrives at all."""
        if self.load <= 0.0:
            return None
        return Plan(view, workers, now, endless=tier, endless_cost=self.mean_cost)


def _tier_stretch(view: QueueView, tier: Tier, workers: list[WorkerInfo], now: float) -> Stretch:
    since = now - ARRIVAL_WINDOW_S
    work = squares = 0.0
    count = 0
    for higher in TIERS[: tier.rank]:
        for arrived in view.recent_arrivals(higher, since=since):
            cost = job_cost(arrived, workers[0])
            work += cost
            squares += cost * cost
            count += 1
    n = len(workers)
    return Stretch(
        load=min(MAX_LOAD, work / ARRIVAL_WINDOW_S / n),
        spread=squares / ARRIVAL_WINDOW_S / (n * n),
        mean_cost=work / count if count else 0.0,
    )


def _free_at(view: QueueView, workers: list[WorkerInfo], now: float) -> list[tuple[float, int]]:
    """A heap of (seconds until free, worker index) once the running jobs are done."""
    free: list[tuple[float, int]] = []
    busy = {w.job_id: w for w in workers if w.job_id}
    for i, worker in enumerate(workers):
        running = view.jobs.get(worker.job_id or "")
        left = remaining(running, worker, now) if running and running.state is JobState.RUNNING else 0.0
        free.append((left, i))
    heapq.heapify(free)
    for job_id in view.running - busy.keys():  # running on a worker whose record is late
        running = view.jobs.get(job_id)
        if running is not None:
            t, i = heapq.heappop(free)
            heapq.heappush(free, (t + remaining(running, workers[i], now), i))
    return free


class EtaCache:
    """The ETA of every queued job from one pass over the queue, so that a status poll costs a lookup
    instead of a pass over the jobs ahead of it (without it, polls and submits slow down as the queue
    grows: behind 1,000 queued jobs a gateway core answered 1,500 status polls/s instead of 5,300, and
    took 200 submits/s instead of 1,500).

    A pass is redone once the view has changed, but under churn (many workers, many submits) at most
    every COST_FACTOR times what the last pass took, and at least every MAX_AGE_S; so an ETA lags the
    view by at most that. A job queued since the last pass after all the jobs in it, in the tier taken
    last (the usual new submit), is added to the end of the cached plan; any other job it lacks gets a
    fresh pass.
    With `now` given, or for a job that is not queued, it is `forecast` itself. An ETA read from a pass
    is counted from the pass: the time since then is taken off as far as every worker was busy meanwhile
    (the work ahead went on; an idle worker's plan starts now whenever it is read).
    """

    MAX_AGE_S = 0.5
    COST_FACTOR = 20.0

    def __init__(self, view: QueueView):
        self.view = view
        self.version = -1
        self.computed = float("-inf")  # monotonic clock
        self.planned_at = 0.0  # the wall-clock time the last pass planned from
        self.all_busy_s = 0.0  # how long after it every worker was still busy with a running job
        self.pass_s = 0.0
        self.etas: dict[str, float] = {}
        self.plan: Plan | None = None
        self.stretches: dict[Tier, Stretch] = {}
        self.bounding: dict[Tier, Plan] = {}  # per tier, the plan that bounds its jobs' waits
        self.last_key: tuple[int, float, str] | None = None

    def forecast(self, status: JobStatus, *, now: float | None = None) -> float | None:
        if now is not None or status.state is not JobState.QUEUED:
            return forecast(self.view, status, now=now)
        if self._fresh():
            age = min(max(0.0, time.time() - self.planned_at), self.all_busy_s)
            eta = self.etas.get(status.job_id)
            if eta is None and self._after_all(status):
                eta = self._append(status, age)
            if eta is not None:
                return max(0.0, eta - age)
        self._recompute()
        eta = self.etas.get(status.job_id)
        if eta is None:  # not in the view's queue (yet): the job is placed by its own pass
            return forecast(self.view, status)
        return eta

    def _fresh(self) -> bool:
        age = time.monotonic() - self.computed
        if age >= self.MAX_AGE_S:
            return False
        return self.view.version == self.version or age < self.COST_FACTOR * self.pass_s

    def _after_all(self, status: JobStatus) -> bool:
        """Whether the job comes after every job of the last pass, in the tier taken last (the usual
        new submit): it is then added to the end of the cached plan."""
        last = self.last_key
        return last is not None and status.tier.rank == last[0] and _order_key(status) > last

    def _append(self, status: JobStatus, age: float) -> float:
        """The job's ETA counted from the last pass, its plan `age` seconds on (its wait is stretched from now)."""
        start, cost = self.plan.append(status)
        bounding = self.bounding.get(status.tier)  # its bound, where the bounding plan also ended in its tier
        bound = None
        if bounding is not None and bounding.last is not None and bounding.last.tier is status.tier:
            bound = max(0.0, bounding.append(status)[0] - age)
        wait = self.stretches[status.tier].wait(max(0.0, start - age), bound)
        eta = self.etas[status.job_id] = age + wait + cost
        self.last_key = _order_key(status)
        return eta

    def _recompute(self) -> None:
        started = time.perf_counter()
        view = self.view
        self.version = view.version
        now = time.time()
        plan = Plan(view, pool(view), now)
        all_busy_s = plan.free[0][0]
        stretches = {tier: _tier_stretch(view, tier, plan.workers, now) for tier in TIERS if view.queued[tier]}
        bounding: dict[Tier, Plan] = {}
        bounds: dict[str, float] = {}
        for tier, stretch in stretches.items():
            if (bounding_plan := stretch.bounding_plan(view, plan.workers, now, tier)) is not None:
                bounding[tier] = bounding_plan
                bounds.update((job.job_id, start) for job, start, _ in bounding_plan.takes() if job.tier is tier)
        etas: dict[str, float] = {}
        for job, start, cost in plan.takes():
            etas[job.job_id] = stretches[job.tier].wait(start, bounds.get(job.job_id)) + cost
        last_key = _order_key(plan.last) if plan.last is not None else None
        self.etas, self.plan, self.stretches, self.bounding, self.last_key = etas, plan, stretches, bounding, last_key
        self.planned_at, self.all_busy_s, self.computed = now, all_busy_s, time.monotonic()
        self.pass_s = time.perf_counter() - started


def _order_key(status: JobStatus) -> tuple[int, float, str]:
    """Where a queued job stands in the order workers take them."""
    return (status.tier.rank, status.submitted_at, status.job_id)


def pool(view: QueueView) -> list[WorkerInfo]:
    """The workers a forecast plans with: the live ones not paused for heat, else every live one, else
    the last one seen."""
    live = view.live_workers()
    return [w for w in live if not w.paused_hot] or live or [_last_known(view)]


def _last_known(view: QueueView) -> WorkerInfo:
    if view.workers:
        return max(view.workers.values(), key=lambda w: w.seen_at)
    return FALLBACK


def jobs_ahead(view: QueueView, status: JobStatus) -> int:
    """mflux-server's task_length: running jobs plus queued jobs ahead, plus the job itself."""
    if status.state is JobState.RUNNING:
        return 1
    if status.state.final:
        return 0
    return len(view.running) + view.position(status) + 1
