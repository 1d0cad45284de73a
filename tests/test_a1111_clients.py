"""AUTOMATIC1111's API driven by `webuiapi`, the usual Python client for it, unchanged apart from the
server address, against the real gateway and a tiny-sdxl worker: its defaults are taken (eta among
them, used as A1111 uses it), and the utility endpoints it calls answer in A1111's shapes. The client
is synchronous, so it runs in a thread while the gateway serves in the test loop."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import webuiapi
from PIL import Image

from gpu_worker import model_hash

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
async def api(service) -> webuiapi.WebUIApi:
    return await asyncio.to_thread(webuiapi.WebUIApi, baseurl=f"{service.url}/sdapi/v1")


async def job_request(http, service, result: webuiapi.WebUIApiResult) -> dict:
    async with http.get(f"{service.url}/v1/jobs/{result.info['job_ids'][0]}") as r:
        return (await r.json())["request"]


async def test_txt2img_and_img2img_with_the_clients_defaults(api, service, http):
    made = await asyncio.to_thread(api.txt2img, prompt="a red boat", seed=7, **SMALL)  # eta=1.0 and the rest as sent
    assert made.image.size == (64, 64) and made.info["all_seeds"] == [7]
    assert made.parameters["eta"] == 1.0 and made.parameters["sampler_name"] == "Euler a"
    request = await job_request(http, service, made)
    assert request["scheduler"] == "euler_a" and "eta" not in request  # Euler a runs at eta 1

    changed = await asyncio.to_thread(api.img2img, images=[made.image], prompt="the same, at night", seed=7, **SMALL)
    assert changed.image.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = await asyncio.to_thread(api.img2img, images=[made.image], mask_image=mask, prompt="a sail", seed=7, **SMALL)
    assert inpainted.image.size == (64, 64)
    assert inpainted.image.convert("RGB").getpixel((2, 2)) == made.image.convert("RGB").getpixel((2, 2))  # kept outside


async def test_ddim_takes_eta_and_ancestral_samplers_only_their_own(api, service, http):
    ddim = {"prompt": "a kite", "seed": 11, "sampler_name": "DDIM", **SMALL}
    still = await asyncio.to_thread(api.txt2img, eta=0.0, **ddim)
    noisy = await asyncio.to_thread(api.txt2img, eta=1.0, **ddim)
    assert (await job_request(http, service, noisy))["eta"] == 1.0
    assert still.image.tobytes() != noisy.image.tobytes()  # eta adds fresh noise at each DDIM step

    euler = await asyncio.to_thread(api.txt2img, prompt="a kite", seed=11, sampler_name="Euler", eta=0.3, **SMALL)
    assert "eta" not in await job_request(http, service, euler)  # ignored, as A1111 ignores it

    with pytest.raises(RuntimeError) as refused:
        await asyncio.to_thread(api.txt2img, prompt="a kite", sampler_name="Euler a", eta=0.5, **SMALL)
    status, text = refused.value.args
    assert status == 422 and '"loc":["body","eta"]' in text.replace(" ", "") and "Euler a runs with eta 1" in text


async def test_the_utility_endpoints_answer_in_a1111s_shapes(api, data_dir):
    calls = (api.get_sd_vae, api.get_upscalers, api.get_latent_upscale_modes, api.get_hypernetworks,
             api.get_face_restorers, api.get_prompt_styles, api.get_embeddings, api.get_scripts, api.get_memory,
             api.get_cmd_flags, api.get_sd_models)
    vae, upscalers, latent, hyper, faces, styles, embeddings, scripts, memory, flags, models = [
        await asyncio.to_thread(call) for call in calls]
    assert vae == upscalers == latent == hyper == faces == styles == []
    assert embeddings == {"loaded": {}, "skipped": {}} and scripts == {"txt2img": [], "img2img": []}
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"] and memory["ram"]["free"] > 0
    assert memory["cuda"] == {"error": "unavailable"}
    assert flags["api"] is True
    for name in ("script-info", "extensions"):
        assert await asyncio.to_thread(lambda: api.session.get(f"{api.baseurl}/{name}").json()) == []
    for name in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
        answer = await asyncio.to_thread(api.session.post, f"{api.baseurl}/{name}")
        assert answer.status_code == 200 and answer.json() is None
    unet = data_dir / "models" / "tiny-sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    sha256 = hashlib.sha256(unet.read_bytes()).hexdigest()
    [tiny] = [m for m in models if m["model_name"] == "tiny-sdxl"]
    assert tiny["sha256"] == sha256 and tiny["hash"] == sha256[:10]
    assert await asyncio.to_thread(api.util_get_model_names) == sorted(m["title"] for m in models)


def test_a_sharded_unet_hashes_its_shards_in_name_order_and_variants_are_left_out(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"second")
    (unet / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"first")
    (unet / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant")
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    assert model_hash.model_sha256(unet) == hashlib.sha256(b"firstsecond").hexdigest()
    assert model_hash.model_sha256(tmp_path / "none") is None
