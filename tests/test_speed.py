"""A worker's speed model: what it measures on every job (the refiner's steps and hand-over apart from
the base's) and what the gateway's ETAs make of it, over real NATS with a simulated engine whose
refiner steps take three times a base step."""

from __future__ import annotations

import asyncio

import pytest

from gpu_worker.speed import SpeedMeter
from schemas.workers import SpeedModel
from tests.helpers.native_reads import ws_events
from tests.helpers.service import start_service, stop_service

BASE_STEP_S, REFINER_FACTOR, HAND_OVER_S = 0.01, 3.0, 0.1
STEPS, SPLIT = 20, 0.5  # 10 base steps, then 10 on the refiner
REFINER_JOB = {"prompt": "refined", "width": 64, "height": 64, "steps": STEPS, "use_refiner": True, "refiner_split": SPLIT}


def test_the_meter_keeps_the_refiner_apart_from_the_base_steps():
    meter = SpeedMeter()
    meter.record(mpx=1.0, steps=30, steps_s=3.0, decode_s=0.2, total_s=3.3)  # no refiner: 0.1 s a step
    model = meter.record(
        mpx=1.0, steps=24, steps_s=2.4, decode_s=0.2, total_s=3.8,
        refiner_steps=6, refiner_s=1.1, refiner_step_s=0.15,  # 0.9 s of steps at 1.5 times a base step, 0.2 s hand-over
    )
    assert model.refiner_step_ratio == pytest.approx(1.5)
    assert model.refiner_fixed_s == pytest.approx(0.2)
    assert model.step_s + model.step_s_per_mpx == pytest.approx(0.1)
    assert model.fixed_s == pytest.approx(0.1)  # the rest of each job: 3.8 - 2.4 - 1.1 - 0.2, 3.3 - 3.0 - 0.2
    assert model.estimate(width=1000, height=1000, steps=24, refiner_steps=6) == pytest.approx(0.1 + 2.4 + 0.2 + 0.9 + model.decode_s_per_mpx)


def test_a_refiner_job_that_ran_one_refiner_step_does_not_guess_the_ratio():
    meter = SpeedMeter()
    model = meter.record(mpx=1.0, steps=9, steps_s=0.9, decode_s=0.1, total_s=1.5, refiner_steps=1, refiner_s=0.4)
    assert model.refiner_step_ratio == 1.0 and model.refiner_fixed_s == 0.0


def test_time_left_counts_the_refiner_still_to_come():
    speed = SpeedModel(decode_s_per_mpx=0.5, refiner_step_ratio=2.0, refiner_fixed_s=0.3)
    # 10 steps, the last 4 on the refiner, a base step measured at 0.1 s, 1 megapixel
    assert speed.left_s(step=2, total=10, refiner_steps=4, step_s=0.1, mpx=1.0) == pytest.approx(0.4 + 0.3 + 0.8 + 0.5)
    assert speed.left_s(step=6, total=10, refiner_steps=4, step_s=0.1, mpx=1.0) == pytest.approx(0.3 + 0.8 + 0.5)
    assert speed.left_s(step=7, total=10, refiner_steps=4, step_s=0.1, mpx=1.0) == pytest.approx(0.6 + 0.5)
    assert speed.left_s(step=7, total=10, refiner_steps=0, step_s=0.1, mpx=1.0) == pytest.approx(0.3 + 0.5)


async def test_a_worker_learns_its_refiner_and_etas_count_it(broker, data_dir, http):
    service = await start_service(
        broker.url, data_dir, model="simulated", refiner=None, preview_every=0,
        sim_step_s=BASE_STEP_S, sim_refiner_step_factor=REFINER_FACTOR, sim_refiner_fixed_s=HAND_OVER_S,
    )
    try:
        warmed_up = await published_speed(http, service.url, samples=3)  # its warm-up ran the refiner once, measured
        assert 2.0 <= warmed_up.refiner_step_ratio <= 4.5, warmed_up  # 3 as the engine runs them, give or take the sleeps
        assert 0.05 <= warmed_up.refiner_fixed_s <= 0.3, warmed_up
        for _ in range(3):  # jobs with the refiner, each measured
            async with http.post(f"{service.url}/v1/jobs?wait=60", json=REFINER_JOB) as r:
                assert r.status == 201, await r.text()
        speed = await published_speed(http, service.url, samples=warmed_up.samples + 3)
        assert 2.0 <= speed.refiner_step_ratio <= 4.5, speed
        assert 0.05 <= speed.refiner_fixed_s <= 0.3, speed

        # the ETA at submission (an idle worker: the job's own cost) counts the refiner's part
        async with http.post(f"{service.url}/v1/jobs", json=REFINER_JOB) as r:
            assert r.status == 202, await r.text()
            submitted = await r.json()
        with_refiner = speed.estimate(width=64, height=64, steps=STEPS // 2, refiner_steps=STEPS // 2)
        as_base_steps = speed.estimate(width=64, height=64, steps=STEPS)
        assert submitted["eta_s"] == pytest.approx(with_refiner, abs=0.005)
        assert with_refiner - as_base_steps > 0.2  # the hand-over and 10 steps at 3 times a base step's 0.01 s

        # while the base runs, the job's progress ETA holds the refiner still to come
        events = await ws_events(http, service.url, submitted["job_id"])
        assert events[-1]["type"] == "done"
        last_base = next(e for e in events if e["type"] == "progress" and e["step"] == STEPS // 2)
        base_step = speed.step_s + speed.step_s_per_mpx * 64 * 64 / 1e6
        assert last_base["eta_s"] >= 0.8 * (speed.refiner_fixed_s + STEPS // 2 * base_step * speed.refiner_step_ratio)
    finally:
        await stop_service(service)


async def published_speed(http, url: str, *, samples: int) -> SpeedModel:
    """The worker's speed model as the gateway lists it, once it counts `samples` jobs."""
    async with asyncio.timeout(30):
        while True:
            async with http.get(f"{url}/v1/workers") as r:
                [worker] = (await r.json())["workers"]
            speed = SpeedModel.model_validate(worker["speed"])
            if speed.samples >= samples and worker["state"] == "idle":
                return speed
            await asyncio.sleep(0.1)
