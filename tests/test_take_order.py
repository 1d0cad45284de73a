"""The gateway's copy of each worker's fairness count, kept from the records it sees, and the forecast
that places queued jobs in the order the workers take them (the records go through the queue view as
the KV watch brings them)."""

from __future__ import annotations

import time

import pytest

from gateway.state.forecast import EtaCache, forecast
from gateway.state.queue_view import QueueView
from schemas.take_order import next_take
from schemas.names import Tier
from schemas.status import JobState, JobStatus
from schemas.workers import WorkerInfo

JOB = {"width": 512, "height": 512, "steps": 20}


class Records:
    """Records written the way the gateway and a worker write them, applied in revision order."""

    def __init__(self, view: QueueView):
        self.view = view
        self.revision = 0
        self.clock = time.time() - 100

    def put(self, status: JobStatus) -> JobStatus:
        self.revision += 1
        self.view.apply(status.model_copy(deep=True), self.revision)
        return status

    def queue(self, name: str, tier: Tier = Tier.NORMAL) -> JobStatus:
        self.clock += 0.001
        return self.put(JobStatus(job_id=name, tier=tier, request=dict(JOB), submitted_at=self.clock))

    def run(self, job: JobStatus, worker: str = "w1") -> None:
        job.state, job.worker, job.attempt, job.started_at = JobState.RUNNING, worker, 1, time.time()
        self.put(job)
        job.state, job.finished_at = JobState.DONE, time.time()
        self.put(job)


class Clock:
    """The forecast's clock: stands still unless moved by hand."""

    def __init__(self) -> None:
        self.now = time.time()
        self.start, self.wall = time.monotonic(), self.now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.start + (self.now - self.wall)

    def perf_counter(self) -> float:
        return time.perf_counter()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    import gateway.state.forecast

    clock = Clock()
    monkeypatch.setattr(gateway.state.forecast, "time", clock)
    return clock


def view_with_worker(fairness: int = 10) -> QueueView:
    view = QueueView(worker_ttl_s=60)
    view.workers["w1"] = WorkerInfo(worker_id="w1", model="m", default_steps=30, default_guidance=5.0, fairness=fairness)
    return view


def test_the_take_rule_gives_a_lower_tier_its_turn_after_fairness_takes():
    waiting = [Tier.HIGH, Tier.NORMAL, Tier.LOW]
    assert next_take(waiting, 0, 3) == (Tier.HIGH, 1)
    assert next_take(waiting, 2, 3) == (Tier.HIGH, 3)
    assert next_take(waiting, 3, 3) == (Tier.LOW, 0)  # the turn goes to the lowest tier with work
    assert next_take([Tier.HIGH, Tier.NORMAL], 3, 3) == (Tier.NORMAL, 0)
    assert next_take([Tier.NORMAL], 2, 3) == (Tier.NORMAL, 2)  # nothing lower waited: not counted
    assert next_take([Tier.LOW], 2, 3) == (Tier.LOW, 0)


def test_the_count_follows_the_jobs_a_worker_marks_running():
    view = view_with_worker(fairness=10)
    records = Records(view)
    records.queue("low", Tier.LOW)
    normals = [records.queue(f"n{i}") for i in range(8)]
    for job in normals:
        records.run(job)
    assert view.takes.of("w1") == 8  # eight normal jobs taken while the low one waited

    later = [records.queue(f"m{i}") for i in range(4)]
    etas = EtaCache(view)
    order = sorted(["low", *(j.job_id for j in later)], key=lambda job_id: etas.forecast(view.jobs[job_id]))
    assert order == ["m0", "m1", "low", "m2", "m3"]  # two more normal takes, then the low tier's turn

    records.run(later[0])
    records.run(later[1])
    records.run(view.jobs["low"].model_copy())
    assert view.takes.of("w1") == 0


def test_a_worker_that_runs_out_of_work_counts_from_zero():
    view = view_with_worker(fairness=10)
    records = Records(view)
    low = records.queue("low", Tier.LOW)
    normals = [records.queue(f"n{i}") for i in range(4)]
    for job in normals[:3]:
        records.run(job)
    assert view.takes.of("w1") == 3
    low.state = JobState.CANCELLED
    records.put(low)
    records.run(normals[3])  # the last queued job ends: the worker finds no work next
    assert view.takes.of("w1") == 0


def test_a_low_tier_job_is_expected_at_its_turn_however_much_higher_tier_work_arrives(clock):
    """Normal-tier jobs keep coming (a minute's worth of arrivals at the pool's full speed), 30 are
    queued: a low-tier job is expected right after the 10 normal jobs before its turn, not after all 30,
    and not stretched by the normal jobs still to come."""
    view = view_with_worker(fairness=10)
    records = Records(view)
    worker = view.workers["w1"]
    cost = worker.speed.estimate(width=512, height=512, steps=20)
    for i in range(int(60 / cost)):  # arrived and ran over the last minute
        records.clock = time.time() - 60 + i * cost
        records.run(records.queue(f"past{i}"))
    records.clock = time.time() - 1
    for i in range(30):
        records.queue(f"n{i}")
    records.queue("low", Tier.LOW)
    etas = EtaCache(view)
    assert etas.forecast(view.jobs["low"]) == pytest.approx(11 * cost)
    assert forecast(view, view.jobs["low"]) == pytest.approx(11 * cost)
    assert etas.forecast(view.jobs["n29"]) == pytest.approx(31 * cost)  # behind 29 normal jobs and the low one
    later = records.queue("later", Tier.LOW)  # after the last pass: added to its end
    assert etas.forecast(view.jobs["later"]) == pytest.approx(forecast(view, later))


def test_an_eta_answered_from_the_last_pass_counts_the_time_since(clock):
    """A poll answered from the last pass (nothing changed since) gets the ETA less the time gone by, as
    the running job went on meanwhile; so does a job submitted since and added to the end of that pass.
    Both match a forecast made from scratch at that moment."""
    view = view_with_worker()
    records = Records(view)
    running = records.queue("running")
    running.state, running.worker, running.attempt, running.started_at = JobState.RUNNING, "w1", 1, clock.time()
    records.put(running)
    records.queue("queued")
    etas = EtaCache(view)
    etas.COST_FACTOR = 1e9  # as under churn, when passes cost enough to be reused across changes
    first = etas.forecast(view.jobs["queued"])

    clock.now += 0.3
    assert etas.forecast(view.jobs["queued"]) == pytest.approx(first - 0.3)
    assert etas.forecast(view.jobs["queued"]) == pytest.approx(forecast(view, view.jobs["queued"]))
    later = records.queue("later")
    assert etas.forecast(view.jobs["later"]) == pytest.approx(forecast(view, later))
