"""Workflows: plans of stages (hires fix, base + refiner, ControlNet) over the native API with the
tiny-sdxl worker of the session (which loads the ControlNet `edges`, built from tiny-sdxl's UNet)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.test_img2img import b64, finished, generated, queue

BASE = {"prompt": "a lighthouse", "seed": 5, "steps": 4, "width": 64, "height": 64, "format": "PNG"}


def square() -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), (16, 16, 48, 48))
    return image


async def test_hires_fix_doubles_the_size_and_counts_both_passes(service, http):
    job, image = await generated(http, service.url, {**BASE, "hires": {"scale": 2, "denoise": 0.5}})
    assert image.shape[:2] == (128, 128)
    assert job["total_steps"] == 6 and job["step"] == 6  # 4 + int(4 x 0.5)


async def test_pixel_upscale_to_a_size(service, http):
    stages = [{"kind": "sample"}, {"kind": "upscale", "space": "pixel", "width": 96, "height": 80, "upscaler": "bicubic"},
              {"kind": "sample", "steps": 4, "denoise": 0.5}]
    _, image = await generated(http, service.url, {**BASE, "stages": stages})
    assert image.shape[:2] == (80, 96)


async def test_base_and_refiner_hand_over_at_the_step_named(service, http):
    stages = [{"steps": 6, "end_step": 4}, {"model": "refiner", "steps": 6, "start_step": 4}]
    job, handed = await generated(http, service.url, {**BASE, "stages": stages})
    _, later = await generated(http, service.url, {**BASE, "stages": [{"steps": 6, "end_step": 5}, {"model": "refiner", "steps": 6, "start_step": 5}]})
    assert job["total_steps"] == 6 and job["step"] == 6
    assert np.abs(handed - later).mean() > 0.5


async def test_controlnet_changes_the_image_and_weight_zero_does_not(service, http):
    _, plain = await generated(http, service.url, BASE)
    _, guided = await generated(http, service.url, {**BASE, "controlnet": {"model": "edges", "image": b64(square()), "preprocessor": "canny"}})
    job, unweighted = await generated(http, service.url, {**BASE, "controlnet": {"model": "edges", "image": b64(square()), "weight": 0}})
    assert np.abs(plain - guided).mean() > 0.5
    assert np.array_equal(plain, unweighted)
    assert job["control_image"]["name"] == f"{job['job_id']}/control"
    assert "image" not in job["request"]["controlnet"]


async def test_plans_that_cannot_run_are_refused_naming_the_field(service, http):
    cases = [
        ({"controlnet": {"model": "depth", "image": b64(square())}}, "controlnet", "depth"),
        ({"stages": [{"kind": "sample"}] + [{"kind": "upscale", "scale": 1}] * 4}, "stages", "at most 4 stages"),
        ({"hires": {"scale": 4}, "width": 1024, "height": 1024}, "hires", "pixel budget"),
        ({"stages": [{"kind": "upscale", "scale": 2}, {"kind": "sample"}]}, "stages.0", "first stage"),
        ({"stages": [{"kind": "sample", "steps": 4, "denoise": 0.5, "start_step": 2}]}, "stages.0", "give one"),
        ({"hires": {"scale": 2, "upscaler": "esrgan"}}, "hires", "esrgan"),
    ]
    for extra, field, words in cases:
        async with http.post(f"{service.url}/v1/jobs", json={**BASE, **extra}) as r:
            body = await r.json()
            assert r.status in (400, 422), body
            text = str(body)
            assert field in text and words in text, body


async def test_a_job_can_be_cancelled_in_its_second_stage(service, http):
    job = await queue(http, service.url, {**BASE, "steps": 30, "hires": {"scale": 2, "steps": 60, "denoise": 1.0}})
    import asyncio
    async with asyncio.timeout(60):
        while True:
            async with http.get(f"{service.url}/v1/jobs/{job['job_id']}") as r:
                status = await r.json()
            if status["step"] > 30 or status["state"] != "running" and status["state"] != "queued":
                break
            await asyncio.sleep(0.05)
    async with http.post(f"{service.url}/v1/jobs/{job['job_id']}/cancel") as r:
        assert r.status in (200, 202), await r.text()
    final = await finished(http, service.url, job["job_id"])
    assert final["state"] == "cancelled" and 30 <= final["step"] < 90
