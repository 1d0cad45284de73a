"""The GPU temperature guard over real NATS: a worker whose sensor the test sets finishes the job in
hand when its GPU turns hot, then takes no new job (it stays queued, the registry says paused-hot)
until the GPU is at the resume temperature, not merely below the limit; then it takes it and completes."""

from __future__ import annotations

import asyncio
import logging

import nats
import pytest

from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from gpu_worker.thermal import TemperatureGuard, temperature_guard
from imagegen import runtime
from schemas import names
from schemas.codec import decode
from schemas.jetstream import Topology
from schemas.workers import WorkerInfo
from tests.helpers.real_processes import job_state, submit, wait_state

TOPOLOGY = Topology(ack_wait_s=10, worker_ttl_s=10)
JOB = {"prompt": "thermal: a kettle", "width": 64, "height": 64, "steps": 20}


class Thermometer:
    """A sensor the test sets; it counts its reads, so the test knows when the worker has looked."""

    def __init__(self, celsius: float):
        self.celsius = celsius
        self.reads = 0

    def read(self) -> float:
        self.reads += 1
        return self.celsius


async def worker_info(nats_url: str, worker_id: str) -> WorkerInfo:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(names.WORKERS_BUCKET)
        return decode((await kv.get(worker_id)).value, WorkerInfo)
    finally:
        await nc.close()


async def reads_after(sensor: Thermometer, n: int) -> None:
    """Waits until the worker has read the sensor `n` more times."""
    target = sensor.reads + n
    async with asyncio.timeout(30):
        while sensor.reads < target:
            await asyncio.sleep(0.02)


async def test_a_hot_gpu_takes_no_new_job_until_it_cools_to_the_resume_temperature(broker, data_dir, http):
    sensor = Thermometer(60.0)
    settings = WorkerSettings(
        nats_url=broker.url, model="simulated", sim_step_s=0.05, data_dir=str(data_dir), heartbeat_s=1.0,
        topology=TOPOLOGY, worker_id="warm-card", max_gpu_temp=85.0, resume_gpu_temp=75.0, gpu_temp_poll_s=0.05,
    )
    worker, task = await runtime.start_worker(settings, warm_up=False, sensor=sensor)
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=TOPOLOGY))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        running = await submit(http, url, JOB)
        await wait_state(http, url, running, {"running"})
        sensor.celsius = 95.0  # hot while a job runs: the job still finishes
        assert (await wait_state(http, url, running, {"done", "failed", "cancelled"}))["state"] == "done"

        waiting = await submit(http, url, {**JOB, "steps": 2})
        await reads_after(sensor, 3)
        assert (await job_state(http, url, waiting))["state"] == "queued"
        async with asyncio.timeout(30):
            while not (info := await worker_info(broker.url, "warm-card")).paused_hot:
                await asyncio.sleep(0.05)
        assert info.state == "paused-hot" and info.gpu_temp_c == 95.0

        sensor.celsius = 80.0  # below the limit, above the resume temperature: still paused
        await reads_after(sensor, 3)
        assert (await job_state(http, url, waiting))["state"] == "queued"

        sensor.celsius = 70.0
        assert (await wait_state(http, url, waiting, {"done", "failed"}))["state"] == "done"
        assert not (await worker_info(broker.url, "warm-card")).paused_hot
    finally:
        await gateway.stop()
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()


def test_the_guard_is_off_without_a_gpu_and_says_so_once(caplog):
    caplog.set_level(logging.INFO, logger="imagegen.worker.thermal")
    assert temperature_guard(WorkerSettings(), device="cpu") is None
    assert temperature_guard(WorkerSettings(max_gpu_temp=0), device="cuda:0") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "no GPU" in lines[0] and "--max-gpu-temp 0" in lines[1]


def test_an_unreadable_sensor_counts_as_cool_and_bad_limits_are_refused():
    class Broken:
        def read(self) -> float:
            raise RuntimeError("sensor gone")

    guard = TemperatureGuard(Broken(), max_c=85, resume_c=75)
    assert guard.hot() is False and guard.last_c is None
    for device in ("cuda:0", "cpu"):  # refused whether or not there is a GPU to guard
        with pytest.raises(ValueError, match="resume-gpu-temp"):
            temperature_guard(WorkerSettings(max_gpu_temp=80, resume_gpu_temp=80), device=device)
