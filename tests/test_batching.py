"""Several images in one pipeline call: each image equals the one its job makes alone (same seed),
every job hears its own progress, and a job cancelled mid-batch drops out while the others finish;
end to end, a request's n images run as one engine call and the worker's metrics count it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpu_worker.engine import GenerationTask
from gpu_worker.errors import JobCancelled
from gpu_worker.sdxl import SdxlEngine, SdxlSettings
from gpu_worker.tiny_sdxl import build_tiny_refiner, build_tiny_sdxl

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
