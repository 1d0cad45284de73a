"""AUTOMATIC1111's API (`/sdapi/v1`) as the tools built for it call it, on the real tiny-sdxl pipeline:
txt2img answers base64 PNGs with A1111's `info`, seeds repeat, batches make one job per image, the
models, samplers and current model are listed and set, and what is not offered is refused by name."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import aiohttp
import nats
import pytest
from PIL import Image

from gateway.apis.a1111 import generation as a1111_generation, inpaint as a1111_inpaint, prompt as a1111_prompt
from gateway.http.auth import new_key_entry
from schemas import names
from schemas.codec import encode
from schemas.events import JobEvent
from tests.helpers.native_reads import jobs_with_prompt
from tests.helpers.service import gateway_with_keys, start_service, stop_service

SMALL = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 2}


async def txt2img(http, service, body: dict) -> tuple[int, dict]:
    async with http.post(f"{service.url}/sdapi/v1/txt2img", json=body) as r:
        return r.status, await r.json()


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


async def test_txt2img_answers_pngs_with_a1111s_info_and_a_seed_repeats(service, http):
    body = {**SMALL, "seed": 1234, "cfg_scale": 6.5, "sampler_name": "Euler a", "negative_prompt": "fog",
            "enable_hr": False, "restore_faces": False, "override_settings": {}, "send_images": True, "save_images": False}
    status, first = await txt2img(http, service, body)
    assert status == 200, first
    assert first["parameters"] == body
    [image] = first["images"]
    assert png(image).size == (64, 64)
    info = json.loads(first["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234]
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6.5 and info["steps"] == 2
    assert info["width"] == 64 and info["height"] == 64 and info["sd_model_name"] == "tiny-sdxl"
    assert info["infotexts"][0].startswith("a red boat\nNegative prompt: fog\nSteps: 2, Sampler: Euler a")
    assert "Seed: 1234" in info["infotexts"][0]
    async with http.get(f"{service.url}/v1/jobs/{info['job_ids'][0]}") as r:
        job = await r.json()
    assert job["request"]["scheduler"] == "euler_a" and job["request"]["guidance"] == 6.5

    status, again = await txt2img(http, service, body)
    assert status == 200 and again["images"] == first["images"]  # the same seed, the same picture


async def test_a_batch_makes_one_job_per_image_with_consecutive_seeds(service, http):
    status, answer = await txt2img(http, service, {**SMALL, "seed": -1, "batch_size": 2, "n_iter": 2})
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 4 and len(set(info["job_ids"])) == 4
    first = info["seed"]
    assert info["all_seeds"] == [first, first + 1, first + 2, first + 3]
    assert all(png(b64).size == (64, 64) for b64 in answer["images"])


async def test_karras_and_a_model_named_per_request(service, http):
    body = {**SMALL, "seed": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}
    status, answer = await txt2img(http, service, body)
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert info["scheduler"] == "Karras" and "Schedule type: Karras" in info["infotexts"][0]
    async with http.get(f"{service.url}/v1/jobs/{info['job_ids'][0]}") as r:
        assert (await r.json())["request"]["scheduler"] == "dpmpp_2m_karras"


async def test_a_refiner_checkpoint_runs_the_workers_refiner(service, http):
    body = {**SMALL, "steps": 4, "refiner_checkpoint": "sd_xl_refiner_1.0.safetensors", "refiner_switch_at": 0.5}
    status, answer = await txt2img(http, service, body)
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert "Refiner switch at: 0.5" in info["infotexts"][0]
    async with http.get(f"{service.url}/v1/jobs/{info['job_ids'][0]}") as r:
        request = (await r.json())["request"]
    assert request["use_refiner"] is True and request["refiner_split"] == 0.5


async def test_settings_a1111_clients_send_along_are_taken_at_their_defaults(service, http):
    settings = {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}
    status, answer = await txt2img(http, service, {**SMALL, "override_settings": settings, "override_settings_restore_afterwards": True})
    assert status == 200, answer
    async with http.post(f"{service.url}/sdapi/v1/options", json=settings) as r:
        assert r.status == 200 and await r.json() is None
    async with http.post(f"{service.url}/sdapi/v1/options", json={**settings, "sd_model_checkpoint": "tiny-sdxl"}) as r:
        assert r.status == 200


async def test_send_images_false_answers_without_images(service, http):
    status, answer = await txt2img(http, service, {**SMALL, "send_images": False})
    assert status == 200 and answer["images"] == [] and len(json.loads(answer["info"])["job_ids"]) == 1


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "'R-ESRGAN 4x+' is not offered here"),
        ({"restore_faces": True}, "restore_faces", "face restoration"),
        ({"alwayson_scripts": {"adetailer": {"args": []}}}, "alwayson_scripts", "only the ControlNet extension's units"),
        ({"styles": ["cinematic"]}, "styles", "put the style in the prompt"),
        ({"s_churn": 0.5}, "s_churn", "only its default"),
        ({"sampler_name": "LMS"}, "sampler_name", "'LMS' is not available here"),
        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler", "Karras is not available with DDIM"),
        ({"sampler_name": "DPM++ 2M SDE"}, "scheduler", "automatic schedule (exponential) is not available"),
        ({"scheduler": "Exponential"}, "scheduler", "'Exponential' is not available"),
        ({"override_settings": {"sd_model_checkpoint": "sd15.ckpt"}}, "override_settings", "unknown model 'sd15.ckpt'"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings", "CLIP_stop_at_last_layers: only its default (1)"),
        ({"override_settings": {"sd_vae": "sdxl_vae.safetensors"}}, "override_settings", "sd_vae: only its default"),
        ({"override_settings": {"sd_hypernetwork": "x"}}, "override_settings", "only sd_model_checkpoint can be set"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"batch_size": 3, "n_iter": 3}, "batch_size", "batch_size x n_iter is 9 images, over the limit of 8"),
        ({"cfg_scale": "strong"}, "cfg_scale", "must be a number, got a string 'strong'"),
        ({"prompt": ""}, "prompt", "prompt"),
        ({"refiner_switch_at": 0.8}, "refiner_switch_at", "needs refiner_checkpoint"),
        ({"hr_upscaler_typo": "x"}, "hr_upscaler_typo", "not a field of txt2img"),
    ],
)
async def test_what_is_not_offered_or_not_valid_is_refused_by_name(service, http, change, field, words):
    status, answer = await txt2img(http, service, {**SMALL, **change})
    assert status == 422, answer
    [problem] = answer["detail"]
    assert problem["loc"] == ["body", field], problem
    assert words in problem["msg"], problem


async def test_the_hires_settings_are_ignored_while_the_hires_fix_is_off_as_in_a1111(service, http):
    status, answer = await txt2img(http, service, {**SMALL, "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7})
    assert status == 200, answer
    assert png(answer["images"][0]).size == (64, 64)


async def test_models_samplers_and_the_current_model(service, http):
    async with http.get(f"{service.url}/sdapi/v1/sd-models") as r:
        models = await r.json()
    assert {"title": "tiny-sdxl", "model_name": "tiny-sdxl"}.items() <= next(m for m in models if m["title"] == "tiny-sdxl").items()
    async with http.get(f"{service.url}/sdapi/v1/samplers") as r:
        names = [s["name"] for s in await r.json()]
    assert "Euler a" in names and "DPM++ 2M" in names
    async with http.get(f"{service.url}/sdapi/v1/schedulers") as r:
        assert [s["label"] for s in await r.json()] == ["Automatic", "Uniform", "Karras"]
    async with http.post(f"{service.url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"}) as r:
        assert r.status == 200 and await r.json() is None
    async with http.get(f"{service.url}/sdapi/v1/options") as r:
        assert (await r.json())["sd_model_checkpoint"] == "tiny-sdxl"
    refused = (({"sd_model_checkpoint": "nope"}, "sd_model_checkpoint"), ({"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers"),
               ({"samples_format": "jpg"}, "samples_format"))
    for body, field in refused:
        async with http.post(f"{service.url}/sdapi/v1/options", json=body) as r:
            assert r.status == 422
            assert (await r.json())["detail"][0]["loc"] == ["body", field]


async def test_with_api_keys_txt2img_needs_a_key_and_its_jobs_are_the_keys(service, http):
    async with gateway_with_keys(service.nats_url, studio=["low"], press=["normal"]) as (url, secrets):
        mine_secret, other_secret = secrets["studio"], secrets["press"]
        async with http.post(f"{url}/sdapi/v1/txt2img", json=SMALL) as r:
            assert r.status == 401
        async with http.post(f"{url}/sdapi/v1/txt2img", json=SMALL, headers={"Authorization": f"Bearer {mine_secret}"}) as r:
            assert r.status == 200, await r.text()
            [job_id] = json.loads((await r.json())["info"])["job_ids"]
        async with http.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {mine_secret}"}) as r:
            assert (await r.json())["tier"] == "low"  # the key's only tier: A1111's API has none
        async with http.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other_secret}"}) as r:
            assert r.status == 404
        # A1111's clients send their --api-auth as HTTP Basic: the key is the password, the user any name
        async with http.get(f"{url}/sdapi/v1/sd-models", auth=aiohttp.BasicAuth("webui", mine_secret)) as r:
            assert r.status == 200 and any(m["title"] == "tiny-sdxl" for m in await r.json())
        async with http.get(f"{url}/sdapi/v1/sd-models", auth=aiohttp.BasicAuth("webui", "not-a-key")) as r:
            assert r.status == 401
        async with http.get(f"{url}/sdapi/v1/sd-models", headers={"Authorization": "Basic %%%"}) as r:
            assert r.status == 401


async def test_waiting_too_long_answers_504_and_cancels_the_jobs(service, http, monkeypatch):
    monkeypatch.setattr(a1111_generation, "WAIT_S", 0.5)
    prompt = "too slow for an A1111 client"
    status, answer = await txt2img(http, service, {"prompt": prompt, "width": 256, "height": 256, "steps": 60, "batch_size": 2})
    assert status == 504 and "not finished within 0.5 seconds" in answer["detail"], answer
    async with asyncio.timeout(60):
        while True:
            jobs = await jobs_with_prompt(http, service.url, prompt)
            if len(jobs) == 2 and all(j["state"] == "cancelled" for j in jobs):
                break
            await asyncio.sleep(0.05)


def init_png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def square_mask(width: int, height: int, box: tuple[int, int, int, int] | None, *, inverted: bool = False) -> str:
    """A black mask, white in `box` (or the other way round)."""
    mask = Image.new("L", (width, height), 255 if inverted else 0)
    if box is not None:
        mask.paste(0 if inverted else 255, box)
    return b64(mask)


def halves(width: int, height: int) -> Image.Image:
    """Red on the left, blue on the right."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((30, 30, 200), (width // 2, 0, width, height))
    return image


async def img2img(http, service, body: dict) -> tuple[int, dict]:
    async with http.post(f"{service.url}/sdapi/v1/img2img", json=body) as r:
        return r.status, await r.json()


async def job_of(http, service, answer: dict) -> dict:
    async with http.get(f"{service.url}/v1/jobs/{json.loads(answer['info'])['job_ids'][0]}") as r:
        return await r.json()


async def test_img2img_without_a_size_keeps_the_init_images_size_and_a1111s_strength(service, http):
    status, answer = await img2img(http, service, {"prompt": "the same, at night", "steps": 4, "seed": 3, "init_images": [init_png(96, 64)]})
    assert status == 200, answer
    assert png(answer["images"][0]).size == (96, 64)
    info = json.loads(answer["info"])
    assert info["width"] == 96 and info["height"] == 64 and info["denoising_strength"] == 0.75
    assert "Denoising strength: 0.75" in info["infotexts"][0] and "Size: 96x64" in info["infotexts"][0]
    job = await job_of(http, service, answer)
    assert job["request"]["strength"] == 0.75 and job["init_image"]["width"] == 96


@pytest.mark.parametrize(("resize_mode", "init_width"), [(0, 64), (1, 96)])
async def test_img2img_resize_mode_0_stretches_the_init_image_and_1_crops_it(service, http, resize_mode, init_width):
    body = {"prompt": "square", "steps": 2, "width": 64, "height": 64, "denoising_strength": 0.5, "resize_mode": resize_mode,
            "init_images": [f"data:image/png;base64,{init_png(96, 64)}"], "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": True}
    status, answer = await img2img(http, service, body)
    assert status == 200, answer
    assert png(answer["images"][0]).size == (64, 64)
    job = await job_of(http, service, answer)
    # mode 0: the gateway stretched the image to 64x64 before queueing it; mode 1: the engine scales and crops
    assert job["init_image"]["width"] == init_width and job["request"]["strength"] == 0.5


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"mask": "aGVsbG8="}, "mask", "not an image"),
        ({"mask": "MASK", "inpainting_fill": 2}, "inpainting_fill", "only 0 (fill) and 1 (original)"),
        ({"mask": "MASK", "inpainting_mask_invert": 2}, "inpainting_mask_invert", "got 2"),
        ({"mask": "MASK", "mask_blur": -1}, "mask_blur", "0..64"),
        ({"mask": "MASK", "mask_blur_y": 65}, "mask_blur_y", "0..64"),
        ({"mask": "MASK", "inpaint_full_res_padding": 300}, "inpaint_full_res_padding", "0..256"),
        ({"mask": "MASK", "initial_noise_multiplier": 0.9}, "initial_noise_multiplier", "only 1"),
        ({"mask": "MASK", "latent_mask": "MASK"}, "latent_mask", "not offered"),
        ({"mask": "BLACK"}, "mask", "black all over"),
        ({"mask": "BLACK", "inpaint_full_res": False}, "mask", "black all over"),
        ({"mask": "SMALL"}, "mask", "must be the same size"),
        ({"init_images": []}, "init_images", "exactly one image is needed here, got 0"),
        ({"init_images": ["x", "y"]}, "init_images", "got 2"),
        ({"init_images": ["bm90IGFuIGltYWdl"]}, "init_images", "not an image"),
        ({"init_images": ["bm90IGFuIGltYWdl"], "width": 64, "height": 64}, "init_images", "not an image"),
        ({"resize_mode": 2}, "resize_mode", "only 0 (just resize) and 1"),
        ({"denoising_strength": 0}, "denoising_strength", "greater than or equal"),
        ({"include_init_images": True}, "include_init_images", "only false"),
        ({"width": 100, "height": 64}, "width", "multiple of 8"),
    ],
)
async def test_img2img_refusals_name_the_field(service, http, change, field, words):
    masks = {"MASK": square_mask(64, 64, (8, 8, 24, 24)), "BLACK": square_mask(64, 64, None), "SMALL": square_mask(32, 32, (8, 8, 24, 24))}
    change = {k: masks.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    body = {"prompt": "p", "steps": 2, "init_images": [init_png(64, 64)], **change}
    status, answer = await img2img(http, service, body)
    assert status == 422, answer
    [problem] = answer["detail"]
    assert problem["loc"] == ["body", field] and words in problem["msg"], problem


async def test_progress_follows_the_callers_newest_request(broker, data_dir, http):
    """A worker of its own, 0.1 s a step: /progress counts the steps of the request's jobs as they run."""
    own = await start_service(broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.1)
    try:
        async with http.get(f"{own.url}/sdapi/v1/progress") as r:
            idle = await r.json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["textinfo"] is None
        call = asyncio.ensure_future(txt2img(http, own, {**SMALL, "steps": 20, "batch_size": 2}))
        seen: list[dict] = []
        async with asyncio.timeout(60):
            while not call.done():
                async with http.get(f"{own.url}/sdapi/v1/progress") as r:
                    seen.append(await r.json())
                await asyncio.sleep(0.1)
        status, answer = await call
        assert status == 200, answer
        running = [p for p in seen if p["state"]["job_count"] == 2 and p["state"]["sampling_step"] > 0]
        assert running, seen
        assert all(p["state"]["sampling_steps"] == 20 and p["textinfo"].startswith("step ") for p in running)
        fractions = [p["progress"] for p in running]
        assert fractions == sorted(fractions) and 0 < fractions[0] < 1
        assert {p["state"]["job"] for p in running} <= set(json.loads(answer["info"])["job_ids"])
        assert any(p["eta_relative"] > 0 for p in running)
        async with http.get(f"{own.url}/sdapi/v1/progress") as r:
            assert (await r.json())["state"]["job_count"] == 0
    finally:
        await stop_service(own)


async def progress_of(http, service, query: str = "") -> dict:
    async with http.get(f"{service.url}/sdapi/v1/progress{query}") as r:
        assert r.status == 200
        return await r.json()


async def until_progress(http, service, ready) -> dict:
    """Polls /sdapi/v1/progress until `ready(answer)`."""
    async with asyncio.timeout(60):
        while not ready(answer := await progress_of(http, service)):
            await asyncio.sleep(0.02)
    return answer


async def test_interrupt_stops_the_request_and_its_call_answers_with_the_images_made(broker, data_dir, http):
    """A worker of its own, 0.05 s a step: after the first of three images, /interrupt stops the one in
    hand and drops the queued one; txt2img answers with the one image made, as A1111 does."""
    own = await start_service(broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.05)
    try:
        call = asyncio.ensure_future(txt2img(http, own, {**SMALL, "steps": 20, "batch_size": 3, "seed": 40}))
        seen = await until_progress(http, own, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] > 0)
        async with http.post(f"{own.url}/sdapi/v1/interrupt") as r:
            assert r.status == 200 and await r.json() == {}
        status, answer = await asyncio.wait_for(call, 30)
        assert status == 200, answer
        info = json.loads(answer["info"])
        assert len(answer["images"]) == 1 and info["all_seeds"] == [40] and len(info["infotexts"]) == 1
        assert len(info["job_ids"]) == 1 and len(info["cancelled_job_ids"]) == 2
        assert seen["state"]["job"] == info["cancelled_job_ids"][0]
        for job_id in info["cancelled_job_ids"]:
            async with http.get(f"{own.url}/v1/jobs/{job_id}") as r:
                assert (await r.json())["state"] == "cancelled"
        assert (await progress_of(http, own))["state"]["job_count"] == 0
        async with http.post(f"{own.url}/sdapi/v1/interrupt") as r:  # nothing running: nothing to stop
            assert r.status == 200 and await r.json() == {}
    finally:
        await stop_service(own)


async def test_skip_drops_only_the_job_in_hand(broker, data_dir, http):
    own = await start_service(broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.05)
    try:
        call = asyncio.ensure_future(txt2img(http, own, {**SMALL, "steps": 20, "batch_size": 2, "seed": 70}))
        seen = await until_progress(http, own, lambda p: p["state"]["job_no"] == 0 and p["state"]["sampling_step"] > 0)
        async with http.post(f"{own.url}/sdapi/v1/skip") as r:
            assert r.status == 200 and await r.json() is None
        status, answer = await asyncio.wait_for(call, 30)
        assert status == 200, answer
        info = json.loads(answer["info"])
        assert info["cancelled_job_ids"] == [seen["state"]["job"]]
        assert len(answer["images"]) == 1 and info["all_seeds"] == [71]  # the second image, made after the skip
    finally:
        await stop_service(own)


async def test_with_api_keys_interrupt_stops_only_the_keys_own_request(broker, data_dir, http):
    mine_secret, mine = new_key_entry("studio", tiers=["normal"], rate_per_minute=100, max_concurrent=10)
    other_secret, other = new_key_entry("press", tiers=["normal"], rate_per_minute=100, max_concurrent=10)
    own = await start_service(
        broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.02, gateway_kw={"api_keys": json.dumps([mine, other])}
    )
    try:
        body = {**SMALL, "steps": 20, "seed": 3}
        call = asyncio.ensure_future(txt2img_as(http, own, body, mine_secret))
        async with asyncio.timeout(30):
            while True:
                async with http.get(f"{own.url}/sdapi/v1/progress", headers={"Authorization": f"Bearer {mine_secret}"}) as r:
                    if (await r.json())["state"]["job_count"] == 1:
                        break
                await asyncio.sleep(0.02)
        async with http.post(f"{own.url}/sdapi/v1/interrupt", headers={"Authorization": f"Bearer {other_secret}"}) as r:
            assert r.status == 200
        async with http.post(f"{own.url}/sdapi/v1/interrupt") as r:
            assert r.status == 401
        status, answer = await asyncio.wait_for(call, 30)
        assert status == 200 and len(answer["images"]) == 1, answer  # the other key stopped nothing of this one
        assert json.loads(answer["info"])["cancelled_job_ids"] == []
    finally:
        await stop_service(own)


async def txt2img_as(http, service, body: dict, secret: str) -> tuple[int, dict]:
    async with http.post(f"{service.url}/sdapi/v1/txt2img", json=body, headers={"Authorization": f"Bearer {secret}"}) as r:
        return r.status, await r.json()


async def test_progress_sends_the_job_in_hands_newest_preview(broker, data_dir, http):
    """The simulated engine makes no latents, so this test sends the previews on the job's event subject
    as a worker does; /progress answers the newest as current_image."""
    own = await start_service(broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.1)
    nc = await nats.connect(broker.url)
    try:
        call = asyncio.ensure_future(txt2img(http, own, {**SMALL, "steps": 30}))
        seen = await until_progress(http, own, lambda p: p["state"]["sampling_step"] > 0)
        assert seen["current_image"] is None  # no preview yet
        job_id = seen["state"]["job"]
        pictures = []
        for step, colour in ((5, (255, 0, 0)), (10, (0, 0, 255))):
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
            pictures.append(buffer.getvalue())
            event = JobEvent(type="preview", job_id=job_id, step=step, total=30, preview=buffer.getvalue())
            await nc.publish(names.events_subject(job_id), encode(event))
        await nc.flush()
        latest = await until_progress(http, own, lambda p: p["current_image"] is not None and base64.b64decode(p["current_image"]) == pictures[-1])
        assert Image.open(io.BytesIO(base64.b64decode(latest["current_image"]))).getpixel((8, 8))[2] > 200  # the blue one
        assert (await progress_of(http, own, "?skip_current_image=true"))["current_image"] is None
        status, answer = await asyncio.wait_for(call, 30)
        assert status == 200, answer
    finally:
        await nc.close()
        await stop_service(own)


@pytest.mark.parametrize("inverted", [False, True])
async def test_inpainting_only_the_masked_area_pastes_it_back_into_the_init_image(service, http, inverted):
    """A1111's default area: the square under the mask (grown to 64x64's aspect) is made at 64x64 and put
    back into the 96x64 image, which stays as it was everywhere else. An inverted mask with
    inpainting_mask_invert 1 is the same mask."""
    original = halves(96, 64)
    body = {"prompt": "a window", "steps": 3, "seed": 11, "width": 64, "height": 64, "denoising_strength": 1.0,
            "init_images": [b64(original)], "mask": square_mask(96, 64, (40, 16, 56, 32), inverted=inverted),
            "inpainting_mask_invert": 1 if inverted else 0, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res_padding": 8}
    status, answer = await img2img(http, service, body)
    assert status == 200, answer
    made = png(answer["images"][0]).convert("RGB")
    assert made.size == (96, 64)
    inside = [made.getpixel((x, y)) for x in range(40, 56) for y in range(16, 32)]
    assert sum(p != original.getpixel((40 + i // 16, 16 + i % 16)) for i, p in enumerate(inside)) > len(inside) // 2
    outside = [(x, y) for x in range(96) for y in range(64) if not (40 <= x < 56 and 16 <= y < 32)]
    assert all(made.getpixel(xy) == original.getpixel(xy) for xy in outside)
    info = json.loads(answer["info"])
    assert info["width"] == 96 and info["height"] == 64
    assert "Inpaint area: Only masked, Masked area padding: 8" in info["infotexts"][0]
    assert "Mask blur: 0, Masked content: original" in info["infotexts"][0]
    job = await job_of(http, service, answer)  # the job made the 32x32 square around the mask, at 64x64
    assert job["init_image"]["width"] == 64 and job["mask_image"]["width"] == 64 and job["request"]["width"] == 64
    if inverted:
        plain = await img2img(http, service, {**body, "mask": square_mask(96, 64, (40, 16, 56, 32)), "inpainting_mask_invert": 0})
        assert plain[1]["images"] == answer["images"]


async def test_inpainting_the_whole_picture_keeps_the_init_image_outside_the_mask(service, http):
    original = halves(64, 64)
    body = {"prompt": "a door", "steps": 3, "seed": 5, "width": 64, "height": 64, "init_images": [b64(original)],
            "mask": square_mask(64, 64, (40, 0, 64, 64)), "inpaint_full_res": False, "mask_blur": 0}
    status, answer = await img2img(http, service, body)
    assert status == 200, answer
    made = png(answer["images"][0]).convert("RGB")
    assert made.size == (64, 64)
    assert all(made.getpixel((x, y)) == original.getpixel((x, y)) for x in range(40) for y in range(64))
    info = json.loads(answer["info"])
    assert "Masked content: fill" in info["infotexts"][0] and "Inpaint area" not in info["infotexts"][0]
    job = await job_of(http, service, answer)
    assert job["mask_image"]["width"] == 64 and job["request"]["strength"] == 0.75


def test_fill_paints_the_masked_part_with_the_colours_around_it():
    original = halves(64, 32)
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))  # the blue half
    result = a1111_inpaint.filled(original, mask)
    assert all(result.getpixel((x, y)) == original.getpixel((x, y)) for x in range(32) for y in range(32))
    r, g, b = result.getpixel((48, 16))
    assert r > 150 and b < 80  # red reached in from the left; no blue is left


def test_the_mask_reads_transparency_rounds_inverts_and_blurs():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (4, 4, 8, 8))  # opaque black square on a transparent sheet: opaque is painted
    mask = a1111_inpaint.read_mask(rgba, a1111_inpaint.MaskSettings(blur_x=0, blur_y=0))
    assert mask.getpixel((5, 5)) == 255 and mask.getpixel((12, 12)) == 0
    grey = Image.new("L", (16, 16), 100)
    assert a1111_inpaint.read_mask(grey, a1111_inpaint.MaskSettings(blur_x=0, blur_y=0)).getpixel((0, 0)) == 0
    assert a1111_inpaint.read_mask(grey, a1111_inpaint.MaskSettings(blur_x=0, blur_y=0, round=False)).getpixel((0, 0)) == 100
    assert a1111_inpaint.read_mask(grey, a1111_inpaint.MaskSettings(blur_x=0, blur_y=0, invert=True)).getpixel((0, 0)) == 255
    square = Image.new("L", (32, 32), 0)
    square.paste(255, (12, 12, 20, 20))
    soft = a1111_inpaint.read_mask(square, a1111_inpaint.MaskSettings(blur_x=3, blur_y=0))
    assert 0 < soft.getpixel((10, 16)) < 255 and soft.getpixel((16, 10)) == 0  # blurred across, not down


@pytest.mark.parametrize(
    ("box", "padding", "size", "region"),
    [
        ((40, 16, 56, 32), 0, (64, 64), (40, 16, 56, 32)),  # square already
        ((40, 16, 56, 32), 8, (64, 64), (32, 8, 64, 40)),  # grown by the padding
        ((10, 30, 50, 34), 0, (64, 64), (10, 12, 50, 52)),  # a flat box grown to a square about its centre
        ((0, 0, 40, 4), 0, (64, 64), (0, 0, 40, 40)),  # ... moved inside the image at its edge
        ((10, 10, 20, 20), 0, (128, 64), (5, 10, 25, 20)),  # grown to 2:1
        ((0, 0, 96, 8), 0, (64, 64), (0, 0, 96, 64)),  # wider than the image is tall: cut at its edges
    ],
)
def test_the_only_masked_region_is_the_masks_box_grown_to_the_output_aspect(box, padding, size, region):
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, box)
    assert a1111_inpaint.crop_region(mask, padding, *size) == region


@pytest.mark.parametrize(
    ("prompt", "left", "loras"),
    [
        ("a boat <lora:style:0.8>, at sea", "a boat , at sea", {"style": 0.8}),
        ("<lora:style> a boat", "a boat", {"style": 1.0}),
        ("a boat <LYCO:ink:-0.5:-0.5> <lora:style:1>", "a boat", {"ink": -0.5, "style": 1.0}),
        ("a boat <embedding> (sharp:1.2)", "a boat <embedding> (sharp:1.2)", {}),
    ],
)
def test_lora_tags_leave_the_prompt_as_loras(prompt, left, loras):
    assert a1111_prompt.loras_of(prompt) == (left, loras)


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("<hypernet:old:1>", "hypernetworks are not offered"),
        ("<lora::1>", "names no adapter"),
        ("<lora:style:strong>", "must be a number"),
        ("<lora:style:0.8:0.5>", "separate text-encoder and UNet weights"),
        ("<lora:style:te=0.8>", "named settings"),
        ("<lora:style:1> <lora:style:0.5>", "named twice"),
    ],
)
async def test_lora_tags_that_cannot_apply_are_refused_by_name(service, http, prompt, words):
    status, answer = await txt2img(http, service, {**SMALL, "prompt": f"a boat {prompt}"})
    assert status == 422, answer
    [problem] = answer["detail"]
    assert problem["loc"] == ["body", "prompt"] and words in problem["msg"], problem


async def test_a_lora_tag_applies_the_workers_adapter_and_an_unknown_one_is_refused(broker, data_dir, http, tmp_path):
    from gpu_worker.engines import tiny_sdxl
    from tests.helpers.loras import build_tiny_lora

    base = tiny_sdxl.build_tiny_sdxl(data_dir / "models" / tiny_sdxl.TINY_SDXL)
    lora = build_tiny_lora(base, tmp_path / "style-lora")
    own = await start_service(broker.url, data_dir, refiner=None, loras=(f"style={lora}",))
    try:
        async with http.get(f"{own.url}/sdapi/v1/loras") as r:
            assert [entry["name"] for entry in await r.json()] == ["style"]
        body = {**SMALL, "seed": 9, "steps": 3}
        status, styled = await txt2img(http, own, {**body, "prompt": "a red boat <lora:style:1>"})
        assert status == 200, styled
        info = json.loads(styled["info"])
        assert info["prompt"] == "a red boat <lora:style:1>" and info["infotexts"][0].startswith("a red boat <lora:style:1>\n")
        job = await job_of(http, own, styled)
        assert job["request"]["prompt"] == "a red boat" and job["request"]["loras"] == {"style": 1.0}
        status, off = await txt2img(http, own, {**body, "prompt": "a red boat <lora:style:0>"})
        status, plain = await txt2img(http, own, body)
        assert status == 200, plain
        assert off["images"] == plain["images"] != styled["images"]  # weight 0 is the plain model
        status, answer = await txt2img(http, own, {**body, "prompt": "a red boat <lora:ink:0.5>"})
        assert status == 422, answer
        assert answer["detail"][0]["loc"] == ["body", "prompt"]
        assert "no adapter 'ink'; they have: style" in answer["detail"][0]["msg"]
        async with http.post(f"{own.url}/v1/jobs", json={"prompt": "a red boat", "loras": {"ink": 0.5}}) as r:
            assert r.status == 400  # the native API checks the same, before anything is queued
            assert "no adapter 'ink'; they have: style" in json.dumps(await r.json())
    finally:
        await stop_service(own)
