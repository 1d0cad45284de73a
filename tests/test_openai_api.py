"""OpenAI's Images API, driven by OpenAI's own Python client against the real gateway and a tiny-sdxl
worker. The client is synchronous, so it runs in a thread while the gateway serves in the test loop."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import openai
import pytest
from PIL import Image

from gateway.apis.openai import images as openai_api
from gateway.http.auth import new_key_entry
from gateway.settings import GatewaySettings
from imagegen import runtime
from tests.helpers.native_reads import jobs_with_prompt


@pytest.fixture
def client(service) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


async def test_two_base64_images_that_differ(client):
    result = await asyncio.to_thread(
        client.images.generate, model="tiny-sdxl", prompt="a lighthouse", n=2, size="64x64", response_format="b64_json"
    )
    assert len(result.data) == 2 and result.created > 0
    images = [decoded(item.b64_json) for item in result.data]
    assert [(im.format, im.size) for im in images] == [("PNG", (64, 64))] * 2
    assert images[0].tobytes() != images[1].tobytes()


async def test_seeds_follow_on_so_an_image_can_be_made_again(client):
    pair = await asyncio.to_thread(
        client.images.generate, model="gpt-image-1", prompt="a kite", n=2, size="64x64", extra_body={"seed": 1234, "steps": 2}
    )
    again = await asyncio.to_thread(  # gpt-image-1 answers base64 unless asked otherwise, as OpenAI's does
        client.images.generate, model="gpt-image-1", prompt="a kite", n=1, size="64x64", extra_body={"seed": 1235, "steps": 2}
    )
    assert [item.seed for item in pair.data] == [1234, 1235]  # imagegen's extra field, kept by the client
    assert decoded(pair.data[1].b64_json).tobytes() == decoded(again.data[0].b64_json).tobytes()
    assert decoded(pair.data[0].b64_json).tobytes() != decoded(again.data[0].b64_json).tobytes()


async def test_urls_fetch_the_images_and_openai_model_names_mean_the_current_model(client, http):
    result = await asyncio.to_thread(
        client.images.generate, model="dall-e-3", prompt="a tram", n=2, size="64x96", response_format="url", quality="low"
    )
    assert len(result.data) == 2
    for item in result.data:
        assert item.url.startswith("http://127.0.0.1:") and item.b64_json is None
        async with http.get(item.url) as r:
            assert r.status == 200 and r.content_type == "image/png"
            assert Image.open(io.BytesIO(await r.read())).size == (64, 96)
    async with http.get(result.data[0].url.removesuffix("/image")) as r:
        job = await r.json()
    assert job["total_steps"] == 2  # quality=low: half of tiny-sdxl's 4 default steps


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com"}


async def image_url(http, url: str, headers: dict[str, str]) -> str:
    body = {"prompt": "a pier", "size": "64x64", "response_format": "url"}
    async with http.post(f"{url}/v1/images/generations", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["data"][0]["url"]


async def test_forwarded_headers_are_ignored_unless_the_peer_is_a_trusted_proxy(service, http):
    port = service.url.rsplit(":", 1)[1]
    steered = await image_url(http, service.url, {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "evil.example"})
    assert steered.startswith(f"http://127.0.0.1:{port}/v1/jobs/")
    assert (await image_url(http, service.url, FORWARDED)).startswith(f"http://127.0.0.1:{port}/v1/jobs/")
    odd_host = await image_url(http, service.url, {"Host": "evil.example/@x"})  # no host[:port]: the address reached
    assert odd_host.startswith(f"http://127.0.0.1:{port}/v1/jobs/"), odd_host
    for trusted in (("127.0.0.1",), ("10.0.0.0/8", "127.0.0.0/8"), ("*",)):
        behind = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, trust_proxy=trusted))
        try:
            url = await image_url(http, f"http://127.0.0.1:{behind.port}", FORWARDED)
            assert url.startswith("https://images.example.com/v1/jobs/"), (trusted, url)
            url = await image_url(http, f"http://127.0.0.1:{behind.port}", {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "a/b@evil"})
            assert url.startswith(f"http://127.0.0.1:{behind.port}/v1/jobs/"), url  # not a scheme or host: ignored
        finally:
            await behind.stop()
    elsewhere = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, trust_proxy=("10.0.0.0/8",)))
    try:  # the proxy named is not the peer
        url = await image_url(http, f"http://127.0.0.1:{elsewhere.port}", FORWARDED)
        assert url.startswith(f"http://127.0.0.1:{elsewhere.port}/v1/jobs/"), url
    finally:
        await elsewhere.stop()


def test_a_trusted_proxy_that_is_no_address_stops_the_gateway_at_start():
    with pytest.raises(ValueError, match="'proxy.local' is not an address"):
        GatewaySettings(trust_proxy=("proxy.local",))


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"size": "63x64"}, "size", "width must be a multiple of 8"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"size": "4096x4096"}, "size", "pixel budget"),
        ({"n": 9}, "n", "between 1 and 8"),
        ({"model": "stable-cascade"}, "model", "tiny-sdxl"),
        ({"prompt": "  "}, "prompt", "empty"),
        ({"response_format": "gif"}, "response_format", "b64_json"),
        ({"quality": "ultra"}, "quality", "hd"),
        ({"output_format": "bmp"}, "output_format", "png"),
        ({"background": "transparent"}, "background", "transparent"),
        ({"extra_body": {"frames": 3}}, "frames", "unrecognized"),
    ],
)
async def test_bad_input_is_a_bad_request_naming_the_param(client, fields, param, words):
    request = {"prompt": "a cat", "size": "64x64", **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        await asyncio.to_thread(client.images.generate, **request)
    error = caught.value
    assert error.status_code == 400 and error.param == param
    assert param in str(error) and words in str(error)
    assert error.body["type"] == "invalid_request_error"


async def test_errors_outside_the_client_are_in_openai_shape_too(service, http):
    async with http.post(f"{service.url}/v1/images/generations", data=b"{not json") as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"]["type"] == "invalid_request_error" and "not JSON" in body["error"]["message"]
    async with http.post(f"{service.url}/v1/images/generations", json={"size": "64x64"}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
    async with http.get(f"{service.url}/openapi.json") as r:
        spec = await r.json()
    operation = spec["paths"]["/v1/images/generations"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIImageRequest")
    assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")


async def test_a_job_cancelled_meanwhile_answers_502_with_the_reason(client, service, http):
    prompt = "cancelled while waiting"
    call = asyncio.ensure_future(
        asyncio.to_thread(client.images.generate, prompt=prompt, size="256x256", extra_body={"steps": 60})
    )
    async with asyncio.timeout(60):
        while not (found := await jobs_with_prompt(http, service.url, prompt)):
            await asyncio.sleep(0.05)
    async with http.post(f"{service.url}/v1/jobs/{found[0]['job_id']}/cancel") as r:
        assert r.status == 200
    with pytest.raises(openai.APIStatusError) as caught:
        await asyncio.wait_for(call, 60)
    assert caught.value.status_code == 502 and "cancelled" in str(caught.value)
    assert caught.value.body["code"] == "job_cancelled"


async def test_waiting_too_long_answers_504_and_cancels_the_jobs(client, service, http, monkeypatch):
    monkeypatch.setattr(openai_api, "WAIT_S", 0.5)
    prompt = "too slow for the caller"
    with pytest.raises(openai.APIStatusError) as caught:
        await asyncio.to_thread(client.images.generate, prompt=prompt, n=2, size="256x256", extra_body={"steps": 60})
    assert caught.value.status_code == 504 and caught.value.body["code"] == "timeout"
    async with asyncio.timeout(60):
        while True:
            jobs = await jobs_with_prompt(http, service.url, prompt)
            if len(jobs) == 2 and all(j["state"] == "cancelled" for j in jobs):
                break
            assert len(jobs) == 2 and all(j["state"] in ("queued", "running", "cancelled") for j in jobs)
            await asyncio.sleep(0.05)


async def test_the_api_key_is_the_openai_key_and_its_tier_is_used(service, http):
    secret, entry = new_key_entry("openai-low", tiers=["low"], rate_per_minute=100, max_concurrent=10)
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, api_keys=json.dumps([entry])))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=120) as keyed:
            result = await asyncio.to_thread(keyed.images.generate, prompt="a key", size="64x64", response_format="url")
        async with http.get(result.data[0].url, headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 200
        async with http.get(result.data[0].url.removesuffix("/image"), headers={"Authorization": f"Bearer {secret}"}) as r:
            assert (await r.json())["tier"] == "low"  # the only tier this key may use
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError):
                await asyncio.to_thread(stranger.images.generate, prompt="no key", size="64x64")
    finally:
        await gateway.stop()
