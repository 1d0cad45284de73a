"""The oracle of `bench/eta_sim.py`, against which the README measures the gateway's forecast: it must
play the queue exactly as the workers take it (schemas.take_order), or the comparison says nothing."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from eta_sim import Oracle  # noqa: E402

NO_ARRIVALS = 1e-12  # jobs per second: none arrives within any wait here
QUEUED = [[("high-1", 1.0)], [("normal-1", 2.0)], [("low-1", 0.5)]]  # high, normal, low: (job id, seconds)


def play(job_id: str, *, free: list[float], skipped: list[int], rate: float = NO_ARRIVALS, fairness: int = 5) -> float:
    return Oracle(rate, fairness, random.Random(1), futures=1).play(QUEUED, free, skipped, 0.0, job_id)


def test_one_worker_takes_the_tiers_in_order_after_its_running_job():
    assert play("high-1", free=[0.25], skipped=[0]) == 1.25
    assert play("normal-1", free=[0.25], skipped=[0]) == 3.25
    assert play("low-1", free=[0.25], skipped=[0]) == 3.75


def test_a_worker_at_its_fairness_count_takes_the_lowest_tier_first():
    assert play("low-1", free=[0.25], skipped=[5]) == 0.75
    assert play("high-1", free=[0.25], skipped=[5]) == 1.75
    assert play("low-1", free=[0.25], skipped=[4], fairness=4) == 0.75


def test_jobs_go_to_whichever_worker_is_free_first():
    assert play("normal-1", free=[0.0, 0.5], skipped=[0, 0]) == 2.5
    assert play("low-1", free=[0.0, 0.5], skipped=[0, 0]) == 1.5


def test_arrivals_delay_a_low_tier_job_without_a_turn_in_sight_and_its_answers_lie_among_the_futures():
    # (with a turn in sight arrivals may bring it forward: cheap high-tier jobs make up the count sooner)
    alone = play("low-1", free=[0.25], skipped=[0], fairness=100)
    busy = Oracle(2.0, 100, random.Random(7), futures=200)
    times = [busy.play(QUEUED, [0.25], [0], 0.0, "low-1") for _ in range(200)]
    assert min(times) >= alone and max(times) > alone
    median, least_relative = busy.answers(QUEUED, [0.25], [0], 0.0, "low-1")
    assert alone <= least_relative <= median <= max(times)
