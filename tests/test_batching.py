"""Several images in one pipeline call: each image equals the one its job makes alone (same seed),
every job hears its own progress, and a job cancelled mid-batch drops out while the others finish;
end to end, a request's n images run as one engine call and the worker's metrics count it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpu_worker.engines.base import GenerationTask
from gpu_worker.errors import JobCancelled
from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings
from gpu_worker.engines.tiny_sdxl import build_tiny_refiner, build_tiny_sdxl
from tests.helpers.images import finished, queue

TASK = GenerationTask(
    job_id="batch", prompt="a lighthouse", negative_prompt="", width=64, height=64, steps=5, guidance=5.0, seed=11
)
TOLERANCE = 1  # pixel levels (0-255): batched matmuls may round differently from single ones


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> SdxlEngine:
    root = tmp_path_factory.mktemp("batch-models")
    return SdxlEngine.load(SdxlSettings(
        model=str(build_tiny_sdxl(root / "tiny-sdxl")), refiner=str(build_tiny_refiner(root / "tiny-sdxl-refiner")),
    ))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize(
    "changes",
    [{}, {"scheduler": "euler_a"}, {"scheduler": "dpmpp_2m_sde", "use_refiner": True, "refiner_split": 0.6},
     {"negative_prompt": "blurry"}],
    ids=["euler", "euler_a", "sde+refiner", "negative"],
)
def test_each_image_of_a_batch_equals_its_job_alone(engine, changes):
    tasks = [dataclasses.replace(TASK, job_id=f"b{i}", seed=TASK.seed + i, **changes) for i in range(3)]
    tasks[2] = dataclasses.replace(tasks[2], prompt="a red barn")  # prompts may differ within a batch
    steps: list[list[int]] = [[] for _ in tasks]
    together = engine.generate_batch(tasks, [lambda s, t, _, i=i: steps[i].append(s) for i in range(3)])
    total = tasks[0].steps
    assert all(seen == list(range(1, total + 1)) for seen in steps), steps
    diffs = [int(np.abs(pixels(image) - pixels(engine.generate(task, lambda *_: None))).max())
             for image, task in zip(together, tasks)]
    print(f"largest pixel difference batched vs alone: {diffs}")
    assert max(diffs) <= TOLERANCE, diffs
    assert not np.array_equal(pixels(together[0]), pixels(together[1]))  # seeds still tell images apart


def test_a_job_cancelled_mid_batch_drops_out_and_the_others_finish(engine):
    tasks = [dataclasses.replace(TASK, job_id=f"c{i}", seed=TASK.seed + i) for i in range(3)]
    steps: list[list[int]] = [[] for _ in tasks]

    def on_step(i):
        def hear(step, total, latents):
            if i == 1 and step == 2:
                raise JobCancelled()
            steps[i].append(step)
        return hear

    outcomes = engine.generate_batch(tasks, [on_step(i) for i in range(3)])
    assert isinstance(outcomes[1], JobCancelled) and steps[1] == [1]
    for i in (0, 2):
        assert steps[i] == list(range(1, TASK.steps + 1))
        alone = engine.generate(tasks[i], lambda *_: None)
        assert np.abs(pixels(outcomes[i]) - pixels(alone)).max() <= TOLERANCE


def test_a_batch_whose_jobs_are_all_cancelled_stops(engine):
    tasks = [dataclasses.replace(TASK, job_id=f"d{i}", seed=i) for i in range(2)]
    calls = []

    def cancel(step, total, latents):
        calls.append(step)
        raise JobCancelled()

    outcomes = engine.generate_batch(tasks, [cancel, cancel])
    assert all(isinstance(o, JobCancelled) for o in outcomes) and calls == [1, 1]


def test_jobs_that_differ_beyond_prompt_and_seed_run_alone(engine):
    tasks = [TASK, dataclasses.replace(TASK, job_id="other-size", width=96)]
    assert engine.batch_key(tasks[0]) != engine.batch_key(tasks[1])
    outcomes = engine.generate_batch(tasks, [lambda *_: None] * 2)
    assert [image.size for image in outcomes] == [(64, 64), (96, 64)]


# -- end to end: the worker takes jobs together ------------------------------------------------------


@pytest.fixture
async def batching_service(broker, tmp_path):
    from tests.helpers.service import start_service, stop_service

    service = await start_service(broker.url, tmp_path / "data", refiner=None, max_batch=4, preview_every=0)
    yield service
    await stop_service(service)


async def png(http, url: str, job_id: str) -> np.ndarray:
    import io

    from PIL import Image

    async with http.get(f"{url}/v1/jobs/{job_id}/image") as r:
        assert r.status == 200, await r.text()
        return pixels(Image.open(io.BytesIO(await r.read())))


def batch_sizes(worker) -> tuple[float, float]:
    """(engine calls, images) the worker's batch-size histogram counted."""
    registry = worker.metrics.registry
    return (registry.get_sample_value("imagegen_worker_batch_size_count") or 0,
            registry.get_sample_value("imagegen_worker_batch_size_sum") or 0)


async def test_a_requests_images_run_as_one_call_each_as_its_job_alone_makes_it(batching_service, http):
    import nats

    from tests.helpers.service import collect_events

    url, worker = batching_service.url, batching_service.worker
    body = {"prompt": "a kite", "seed": 900, "steps": 6, "width": 64, "height": 64, "format": "PNG", "cache": False}
    before = batch_sizes(worker)
    group = await queue(http, url, {**body, "n": 3})
    jobs = [await finished(http, url, job_id) for job_id in group["job_ids"]]
    assert [job["state"] for job in jobs] == ["done"] * 3
    after = batch_sizes(worker)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)  # one engine call made the three
    nc = await nats.connect(batching_service.nats_url)
    try:
        for job_id in group["job_ids"]:  # each job told its own progress, step by step
            events = await collect_events(nc.jetstream(), job_id)
            assert [e.step for e in events if e.type == "progress"] == list(range(1, 7))
            assert events[-1].type == "done"
    finally:
        await nc.close()
    for i, job_id in enumerate(group["job_ids"]):
        single = await queue(http, url, {**body, "seed": 900 + i})
        assert (await finished(http, url, single["job_id"]))["state"] == "done"
        difference = np.abs(await png(http, url, job_id) - await png(http, url, single["job_id"])).max()
        assert difference <= TOLERANCE, (i, difference)


async def test_one_job_cancelled_in_a_batch_ends_cancelled_and_the_others_finish(batching_service, http):
    import asyncio

    url, worker = batching_service.url, batching_service.worker
    before = batch_sizes(worker)
    body = {"prompt": "a tram", "seed": 5, "steps": 100, "width": 192, "height": 192, "n": 3, "cache": False}
    group = await queue(http, url, body)
    target = group["job_ids"][1]
    async with asyncio.timeout(60):
        while True:  # cancel once the batch is under way
            async with http.get(f"{url}/v1/jobs/{target}") as r:
                if (await r.json()).get("step", 0) >= 1:
                    break
            await asyncio.sleep(0.02)
    async with http.post(f"{url}/v1/jobs/{target}/cancel") as r:
        assert r.status in (200, 202), await r.text()
    cancelled = await finished(http, url, target)
    assert cancelled["state"] == "cancelled" and cancelled["step"] < 100
    others = [await finished(http, url, job_id) for job_id in group["job_ids"] if job_id != target]
    assert [job["state"] for job in others] == ["done", "done"]
    assert cancelled["finished_at"] < min(job["finished_at"] for job in others)  # told at its step, not at the end
    after = batch_sizes(worker)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)


async def test_compatible_jobs_of_different_requests_queued_together_share_a_call(batching_service, http):
    import asyncio

    url, worker = batching_service.url, batching_service.worker
    before = batch_sizes(worker)
    busy = await queue(http, url, {"prompt": "a long one", "steps": 40, "width": 128, "height": 128, "cache": False})
    async with asyncio.timeout(60):
        while (await finished_or_running(http, url, busy["job_id"])) == "queued":
            await asyncio.sleep(0.02)
    small = {"steps": 3, "width": 64, "height": 64, "cache": False}
    first = await queue(http, url, {**small, "prompt": "a fox", "seed": 1})
    second = await queue(http, url, {**small, "prompt": "a hen", "seed": 2})  # another prompt, same call
    for job_id in (busy["job_id"], first["job_id"], second["job_id"]):
        assert (await finished(http, url, job_id))["state"] == "done"
    after = batch_sizes(worker)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 3)  # the busy job alone, then the two together


async def finished_or_running(http, url: str, job_id: str) -> str:
    async with http.get(f"{url}/v1/jobs/{job_id}") as r:
        return (await r.json())["state"]
