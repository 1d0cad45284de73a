"""Workflows: plans of stages (hires fix, base + refiner, ControlNet) over the native API with the
tiny-sdxl worker of the session (which loads the ControlNet `edges`, built from tiny-sdxl's UNet)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.helpers.images import b64, finished, generated, queue

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


# -- ComfyUI's prompt API ---------------------------------------------------------------------------

from tests.helpers.comfy import history_when_done, queue_prompt, upload, workflow  # noqa: E402


def sdxl_base_and_refiner(*, steps: int = 6, hand_over: int = 4) -> dict:
    """ComfyUI's standard SDXL workflow: two checkpoints, the SDXL text encoders, two KSamplerAdvanced."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
                                                             "target_height": 1024, "text_g": "a lighthouse", "text_l": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
                                                             "target_height": 1024, "text_g": "blurry", "text_l": "", "clip": ["4", 1]}},
        "15": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"ascore": 6, "width": 1024, "height": 1024, "text": "a lighthouse", "clip": ["12", 1]}},
        "16": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"ascore": 2.5, "width": 1024, "height": 1024, "text": "blurry", "clip": ["12", 1]}},
        "10": {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "enable", "noise_seed": 7, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
            "start_at_step": 0, "end_at_step": hand_over, "return_with_leftover_noise": "enable",
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
            "start_at_step": hand_over, "end_at_step": 10000, "return_with_leftover_noise": "disable",
            "model": ["12", 0], "positive": ["15", 0], "negative": ["16", 0], "latent_image": ["10", 0]}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 2]}},
        "19": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["17", 0]}},
    }


def hires_fix(*, pixel: bool = False) -> dict:
    graph = workflow(**{"3": {"steps": 4}})
    second = {"seed": 5, "steps": 4, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.5,
              "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["20", 0]}
    graph["21"] = {"class_type": "KSampler", "inputs": second}
    if pixel:
        graph["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
        graph["23"] = {"class_type": "ImageScale", "inputs": {"image": ["22", 0], "upscale_method": "bicubic", "width": 96, "height": 80, "crop": "disabled"}}
        graph["20"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["23", 0], "vae": ["4", 2]}}
    else:
        graph["20"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 2.0}}
    graph["8"]["inputs"]["samples"] = ["21", 0]
    return graph


def with_controlnet(name: str, strength: float = 1.0, net: str = "edges.safetensors") -> dict:
    graph = workflow(**{"3": {"positive": ["31", 0], "negative": ["31", 1], "steps": 4}})
    graph["30"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": net}}
    graph["32"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    graph["33"] = {"class_type": "Canny", "inputs": {"image": ["32", 0], "low_threshold": 0.4, "high_threshold": 0.8}}
    graph["31"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["30", 0], "image": ["33", 0],
        "strength": strength, "start_percent": 0.0, "end_percent": 1.0}}
    return graph


async def comfy_images(http, url: str, graph: dict) -> list[tuple[dict, np.ndarray]]:
    status, queued = await queue_prompt(http, url, graph)
    assert status == 200, queued
    entry = await history_when_done(http, url, queued["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    found = []
    for image in next(iter(entry["outputs"].values()))["images"]:
        async with http.get(f"{url}/view", params={"filename": image["filename"]}) as r:
            data = await r.read()
        async with http.get(f"{url}/v1/jobs/{image['filename'].removesuffix('.png')}") as r:
            job = await r.json()
        found.append((job, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)))
    return found


async def test_comfy_standard_sdxl_workflow_hands_over_to_the_refiner(service, http):
    [(job, image)] = await comfy_images(http, service.url, sdxl_base_and_refiner(hand_over=4))
    assert job["request"]["stages"][0]["end_step"] == 4 and job["request"]["stages"][1] == {
        "kind": "sample", "model": "refiner", "steps": 6, "guidance": 8.0, "scheduler": "euler", "start_step": 4}
    assert job["total_steps"] == 6 and job["step"] == 6
    [(_, later)] = await comfy_images(http, service.url, sdxl_base_and_refiner(hand_over=5))
    assert np.abs(image - later).mean() > 0.5


async def test_comfy_hires_fix_graphs_make_the_larger_image(service, http):
    [(job, image)] = await comfy_images(http, service.url, hires_fix())
    assert image.shape[:2] == (128, 128) and job["total_steps"] == 6
    [(_, image)] = await comfy_images(http, service.url, hires_fix(pixel=True))
    assert image.shape[:2] == (80, 96)


async def test_comfy_controlnet_and_a_batch(service, http):
    square_png = io.BytesIO()
    square().save(square_png, format="PNG")
    status, _ = await upload(http, service.url, square_png.getvalue(), "square.png", overwrite="true")
    assert status == 200
    [(_, plain)] = await comfy_images(http, service.url, workflow(**{"3": {"steps": 4}}))
    [(job, guided)] = await comfy_images(http, service.url, with_controlnet("square.png"))
    [(_, unweighted)] = await comfy_images(http, service.url, with_controlnet("square.png", strength=0.0))
    assert job["request"]["stages"][0]["controlnet"]["preprocessor"] == "canny"
    assert np.abs(plain - guided).mean() > 0.5 and np.array_equal(plain, unweighted)
    status, refused = await queue_prompt(http, service.url, with_controlnet("square.png", net="depth.safetensors"))
    assert status == 400 and "depth" in str(refused), refused
    batch = workflow(**{"3": {"latent_image": ["40", 0], "steps": 2}})
    batch["40"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": 2}}
    assert len(await comfy_images(http, service.url, batch)) == 2


# -- AUTOMATIC1111's API ----------------------------------------------------------------------------

import base64 as _base64  # noqa: E402
import json as _json  # noqa: E402

A1111 = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 4, "seed": 9, "sampler_name": "Euler"}


async def a1111(http, url: str, body: dict, path: str = "txt2img") -> tuple[dict, np.ndarray]:
    async with http.post(f"{url}/sdapi/v1/{path}", json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
    data = _base64.b64decode(answer["images"][0])
    return _json.loads(answer["info"]), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


async def test_a1111_hires_fix_upscales_and_reports_it(service, http):
    info, image = await a1111(http, service.url, {**A1111, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
                                                  "hr_second_pass_steps": 4, "denoising_strength": 0.5})
    assert image.shape[:2] == (128, 128) and (info["width"], info["height"]) == (128, 128)
    assert "Hires upscale: 2" in info["infotexts"][0] and "Hires upscaler: Latent" in info["infotexts"][0]
    assert info["denoising_strength"] == 0.5
    info, image = await a1111(http, service.url, {**A1111, "enable_hr": True, "hr_resize_x": 96, "hr_upscaler": "Lanczos"})
    assert image.shape[:2] == (96, 96) and "Hires resize: 96x96" in info["infotexts"][0]


async def test_a1111_controlnet_unit_guides_the_image(service, http):
    unit = {"enabled": True, "module": "canny", "model": "edges [0123abcd]", "weight": 1.0, "image": b64(square()),
            "guidance_start": 0.0, "guidance_end": 1.0}
    _, plain = await a1111(http, service.url, A1111)
    info, guided = await a1111(http, service.url, {**A1111, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    _, unweighted = await a1111(http, service.url, {**A1111, "alwayson_scripts": {"controlnet": {"args": [{**unit, "weight": 0}]}}})
    assert np.abs(plain - guided).mean() > 0.5 and np.array_equal(plain, unweighted)
    assert "ControlNet 0" in info["extra_generation_params"] and "Module: canny" in info["infotexts"][0]
    for bad, words in (({**unit, "module": "depth_midas"}, "'depth_midas' is not offered"), ({**unit, "model": "depth"}, "'depth'")):
        async with http.post(f"{service.url}/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {"controlnet": {"args": [bad]}}}) as r:
            answer = await r.json()
            assert r.status == 422 and answer["detail"][0]["loc"] == ["body", "alwayson_scripts"], answer
            assert words in answer["detail"][0]["msg"], answer


# -- straight onto NATS -----------------------------------------------------------------------------


async def test_a_nats_publisher_sends_a_plan_with_its_control_image_as_an_upload(service):
    import nats
    import pytest as _pytest

    from schemas import names
    from schemas.codec import decode, encode
    from schemas.job import JobEnvelope, Placement
    from schemas.request import parse_request
    from schemas.status import JobState, JobStatus, UploadRef
    from tests.helpers.service import collect_events

    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    png = io.BytesIO()
    square().save(png, format="PNG")
    await (await js.object_store(names.UPLOADS_BUCKET)).put("publisher-c/square.png", png.getvalue())
    request = parse_request({**BASE, "hires": {"scale": 2, "denoise": 0.5}, "controlnet": {"model": "edges", "preprocessor": "canny"}})
    with _pytest.raises(ValueError, match="control image travels through object store"):
        JobEnvelope.for_request(request.model_copy(update={"controlnet": request.controlnet.model_copy(update={"image": b64(square())})}))
    envelope = JobEnvelope.for_request(request, placement=Placement(control_image=UploadRef(name="publisher-c/square.png")))
    await js.publish(names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    events = await collect_events(js, envelope.job_id)
    assert events[-1].type == "done", events[-1]
    assert [e.step for e in events if e.type == "progress"] == [1, 2, 3, 4, 5, 6]
    assert all(e.total == 6 for e in events if e.type == "progress")
    status = decode((await (await js.key_value(names.STATUS_BUCKET)).get(envelope.job_id)).value, JobStatus)
    assert status.state is JobState.DONE and status.control_image.name == "publisher-c/square.png"
    assert (status.image.width, status.image.height) == (128, 128)
    await nc.close()


async def test_mflux_generate_takes_the_hires_shorthand_and_a_controlnet_needs_its_image(service, http):
    from tests.helpers.service import wait_status

    async with http.post(f"{service.url}/api/generate", json={**BASE, "hires": {"scale": 1.5, "denoise": 0.5}}) as r:
        assert r.status == 200, await r.text()
        task_id = (await r.json())["task_id"]
    assert (await wait_status(http, service.url, task_id))["status"] == "done"
    async with http.get(f"{service.url}/api/image", params={"task_id": task_id}) as r:
        assert Image.open(io.BytesIO(await r.read())).size == (96, 96)
    async with http.post(f"{service.url}/v1/jobs", json={**BASE, "controlnet": {"model": "edges"}}) as r:
        assert r.status in (400, 422) and "needs a control image" in await r.text()


async def test_comfy_plan_problems_name_the_node(service, http):
    square_png = io.BytesIO()
    square().save(square_png, format="PNG")
    await upload(http, service.url, square_png.getvalue(), "square.png", overwrite="true")
    status, refused = await queue_prompt(http, service.url, with_controlnet("square.png", net="depth.safetensors"))
    assert status == 400 and "30" in refused["node_errors"], refused  # the ControlNetLoader
    assert refused["node_errors"]["30"]["errors"][0]["extra_info"]["input_name"] == "control_net_name"
    huge = hires_fix()
    huge["20"]["inputs"]["scale_by"] = 4.0
    huge["5"]["inputs"].update(width=1024, height=1024)
    status, refused = await queue_prompt(http, service.url, huge)
    assert status == 400 and "20" in refused["node_errors"] and "pixel budget" in str(refused), refused
    bislerp = hires_fix()
    bislerp["20"]["inputs"]["upscale_method"] = "bislerp"
    status, refused = await queue_prompt(http, service.url, bislerp)
    assert status == 400 and refused["node_errors"]["20"]["errors"][0]["extra_info"]["input_name"] == "upscale_method", refused


async def test_comfy_outputs_of_the_first_pass_and_the_final_image_each_get_their_own(service, http):
    graph = hires_fix()
    graph["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    graph["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["22", 0]}}
    status, queued = await queue_prompt(http, service.url, graph)
    assert status == 200, queued
    entry = await history_when_done(http, service.url, queued["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    sizes = {}
    for node in ("9", "23"):
        [image] = entry["outputs"][node]["images"]
        async with http.get(f"{service.url}/view", params={"filename": image["filename"], "type": image["type"]}) as r:
            sizes[node] = Image.open(io.BytesIO(await r.read())).size
    assert sizes == {"9": (128, 128), "23": (64, 64)}


async def test_a1111_img2img_takes_a_controlnet_unit(service, http):
    init = b64(Image.new("RGB", (64, 64), (200, 40, 30)))
    body = {**A1111, "init_images": [init], "denoising_strength": 0.6}
    unit = {"enabled": True, "module": "none", "model": "edges", "weight": 1.0, "image": b64(square())}
    _, plain = await a1111(http, service.url, body, "img2img")
    _, guided = await a1111(http, service.url, {**body, "alwayson_scripts": {"ControlNet": {"args": [unit, {"enabled": False}]}}}, "img2img")
    assert np.abs(plain - guided).mean() > 0.5
    async with http.post(f"{service.url}/sdapi/v1/img2img", json={**body, "enable_hr": True}) as r:
        assert r.status == 422 and "txt2img's" in await r.text()


# -- the engine itself ------------------------------------------------------------------------------


def test_a_controlnet_loads_beside_a_lora_and_both_act_on_one_image(tmp_path):
    from gpu_worker.engines.base import GenerationTask
    from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings
    from gpu_worker.engines.tiny_sdxl import build_tiny_sdxl
    from schemas.plan import expand
    from schemas.request import parse_request
    from tests.helpers.loras import build_tiny_lora

    base = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    engine = SdxlEngine.load(SdxlSettings(
        model=str(base), loras=(f"style={build_tiny_lora(base, tmp_path / 'style-lora')}",),
        controlnets=("edges=tiny-controlnet",), models_dir=str(tmp_path),
    ))
    assert engine.controlnet_names == ("edges",)

    def image(loras=(), weight=1.0):
        request = parse_request({**BASE, "controlnet": {"model": "edges", "weight": weight}})
        task = GenerationTask(job_id="engine-test", prompt="a lighthouse", negative_prompt="", width=64, height=64, steps=4,
                              guidance=5.0, seed=5, loras=loras, stages=tuple(expand(request, default_steps=4)), control_image=square())
        return np.asarray(engine.generate(task, lambda *_: None), dtype=np.int16)

    plain, styled, unguided = image(), image(loras=(("style", 1.0),)), image(weight=0.0)
    assert np.abs(plain - styled).mean() > 0.5 and np.abs(plain - unguided).mean() > 0.5


async def test_comfy_object_info_lists_the_workflow_nodes_and_the_controlnets(service, http):
    async with http.get(f"{service.url}/object_info") as r:
        info = await r.json()
    assert {"KSamplerAdvanced", "CLIPTextEncodeSDXL", "LatentUpscaleBy", "ControlNetApplyAdvanced", "RepeatLatentBatch"} <= set(info)
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"] == [["edges"]]
    async with http.get(f"{service.url}/models/controlnet") as r:
        assert await r.json() == ["edges"]
