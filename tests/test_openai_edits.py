"""OpenAI's image edits, variations and model list, driven by OpenAI's own Python client against the
real gateway and a tiny-sdxl worker: a mask's transparent area is redrawn and the rest kept, an opaque
image without a mask is changed as image-to-image, variations keep the image's size, the served
models are listed, and `response_format` defaults as OpenAI's does."""

from __future__ import annotations

import asyncio
import base64
import io
import logging

import aiohttp
import openai
import pytest
from PIL import Image

from tests.helpers.comfy import MALFORMED_FORMS

STEPS = {"steps": 2}


@pytest.fixture
def client(service) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def halves(width: int, height: int) -> Image.Image:
    """Red on the left, blue on the right."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((30, 30, 200), (width // 2, 0, width, height))
    return image


def hole_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Opaque, with a fully transparent `box`: the part to redraw, in OpenAI's terms."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image.convert("RGB")


async def request_of(http, service, job_id: str) -> dict:
    async with http.get(f"{service.url}/v1/jobs/{job_id}") as r:
        return (await r.json())["request"]


async def test_an_edit_redraws_the_masks_transparent_area_and_keeps_the_rest(client, service, http):
    original = halves(64, 64)
    result = await asyncio.to_thread(
        client.images.edit, image=("boat.png", png_bytes(original), "image/png"),
        mask=("mask.png", png_bytes(hole_mask(64, 64, (16, 16, 48, 48))), "image/png"),
        prompt="a white sail", response_format="b64_json", extra_body={**STEPS, "seed": 3},
    )
    [item] = result.data
    edited = decoded(item.b64_json)
    assert edited.size == (64, 64)
    assert edited.getpixel((2, 2)) == original.getpixel((2, 2)) and edited.getpixel((61, 61)) == original.getpixel((61, 61))
    assert list(edited.crop((16, 16, 48, 48)).getdata()) != list(original.crop((16, 16, 48, 48)).getdata())
    request = await request_of(http, service, item.job_id)
    assert request["strength"] == 1.0 and request["prompt"] == "a white sail"


async def test_without_a_mask_the_images_own_transparent_area_is_redrawn(client, service, http):
    original = halves(64, 64).convert("RGBA")
    original.paste((0, 0, 0, 0), (0, 0, 32, 32))
    result = await asyncio.to_thread(
        client.images.edit, model="gpt-image-1", image=("holed.png", png_bytes(original), "image/png"), prompt="a sun", extra_body=STEPS,
    )
    edited = decoded(result.data[0].b64_json)  # gpt-image-1's default: base64
    assert edited.getpixel((60, 60)) == original.convert("RGB").getpixel((60, 60))  # kept where opaque
    async with http.get(f"{service.url}/v1/jobs/{result.data[0].job_id}") as r:
        assert (await r.json())["mask_image"]["width"] == 64  # inpainted, with the alpha as the mask


async def test_an_edit_of_an_opaque_image_without_a_mask_is_image_to_image_and_answers_urls_for_dall_e(client, service, http):
    result = await asyncio.to_thread(
        client.images.edit, model="dall-e-2", image=[("boat.png", png_bytes(halves(96, 64)), "image/png")],
        prompt="the same, at night", n=2, extra_body=STEPS,
    )
    assert len(result.data) == 2 and all(item.b64_json is None for item in result.data)  # dall-e-2's default: url
    async with http.get(result.data[0].url) as r:
        assert r.status == 200 and Image.open(io.BytesIO(await r.read())).size == (96, 64)
    assert (await request_of(http, service, result.data[0].job_id))["strength"] == 0.75


async def test_variations_keep_the_images_size_unless_a_size_is_named(client, service, http):
    image = ("boat.png", png_bytes(halves(96, 64)), "image/png")
    result = await asyncio.to_thread(client.images.create_variation, image=image, n=2, response_format="b64_json", extra_body=STEPS)
    assert [decoded(item.b64_json).size for item in result.data] == [(96, 64)] * 2
    assert decoded(result.data[0].b64_json).tobytes() != decoded(result.data[1].b64_json).tobytes()
    square = await asyncio.to_thread(client.images.create_variation, image=image, size="256x256", extra_body={"steps": 1})
    async with http.get(square.data[0].url) as r:  # no model: url, as OpenAI answers
        assert Image.open(io.BytesIO(await r.read())).size == (256, 256)


async def test_generations_answer_urls_unless_the_model_is_a_gpt_image_one(client, http):
    plain = await asyncio.to_thread(client.images.generate, prompt="a tram", size="64x64", extra_body=STEPS)
    assert plain.data[0].url and plain.data[0].b64_json is None
    gpt = await asyncio.to_thread(client.images.generate, model="gpt-image-1", prompt="a tram", size="64x64", extra_body=STEPS)
    assert gpt.data[0].b64_json and gpt.data[0].url is None


async def test_the_served_models_are_listed_in_openais_shape(client):
    listed = await asyncio.to_thread(client.models.list)
    ids = [model.id for model in listed]
    assert "tiny-sdxl" in ids and all(model.object == "model" and model.created > 0 for model in listed)
    assert (await asyncio.to_thread(client.models.retrieve, "tiny-sdxl")).owned_by == "imagegen"
    assert (await asyncio.to_thread(client.models.retrieve, "dall-e-3")).id == "dall-e-3"  # the current model's alias
    with pytest.raises(openai.NotFoundError) as missing:
        await asyncio.to_thread(client.models.retrieve, "no-such-model")
    assert missing.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("files", "param", "words"),
    [
        ({"mask": ("m.png", png_bytes(hole_mask(32, 32, (0, 0, 8, 8))), "image/png")}, "mask", "must be the same size"),
        ({"mask": ("m.png", png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 255))), "image/png")}, "mask", "opaque all over"),
        ({"image": [("a.png", png_bytes(halves(64, 64)), "image/png")] * 2}, "image", "one image is edited here, got 2"),
        ({"image": ("a.txt", b"not a picture", "text/plain")}, "image", "not an image"),
    ],
)
async def test_edits_that_cannot_be_made_are_refused_naming_the_param(client, files, param, words):
    body = {"image": ("boat.png", png_bytes(halves(64, 64)), "image/png"), "prompt": "x", **files}
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(client.images.edit, **body)
    assert refused.value.param == param and words in refused.value.message


@pytest.mark.parametrize(
    ("path", "fields", "param", "words"),
    [
        ("edits", {"prompt": "x"}, "image", "Missing required parameter"),
        ("edits", {"image": "text, not a file", "prompt": "x"}, "image", "send it as a file"),
        ("edits", {"file:image": b"", "prompt": "x", "n": "two"}, "n", "valid integer"),
        ("edits", {"file:image": b"", "prompt": "x", "n": "0"}, "n", "greater than or equal to 1"),
        ("edits", {"file:image": b"", "prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ("edits", {"file:image": b"", "prompt": "x", "stream": "true"}, "stream", "streaming is not available"),
        ("edits", {"file:image": b"", "prompt": "x", "file:markup": b"x"}, "markup", "unrecognized file field"),
        ("edits", {"file:image": b"", "prompt": "x", "svg": "1"}, "svg", "unrecognized request argument"),
        ("variations", {"file:image": b"", "n": "100"}, "n", "between 1 and 8"),
        ("variations", {"file:image": b"not an image"}, "image", "not an image"),
    ],
)
async def test_bad_forms_are_refused_naming_the_param(service, http, path, fields, param, words):
    form = aiohttp.FormData()
    for name, value in fields.items():
        if name.startswith("file:"):
            form.add_field(name[5:], value or png_bytes(halves(64, 64)), filename="a.png", content_type="image/png")
        else:
            form.add_field(name, value)
    async with http.post(f"{service.url}/v1/images/{path}", data=form) as r:
        answer = await r.json()
    assert r.status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


async def test_a_body_that_is_no_form_is_refused(service, http):
    async with http.post(f"{service.url}/v1/images/edits", json={"prompt": "x"}) as r:
        assert r.status == 400 and "multipart/form-data" in (await r.json())["error"]["message"]
    headers = {"Content-Type": "multipart/form-data; boundary=zz"}
    async with http.post(f"{service.url}/v1/images/variations", data=b"--zz\r\ngarbage", headers=headers) as r:
        assert r.status == 400, await r.text()


@pytest.mark.parametrize("body", MALFORMED_FORMS.values(), ids=MALFORMED_FORMS.keys())
@pytest.mark.parametrize("path", ["edits", "variations"])
async def test_a_malformed_multipart_form_is_a_400_in_openais_shape(service, http, caplog, path, body):
    """A NUL in a part's file name, an unknown charset or transfer encoding, a truncated body: the one
    form reader refuses it; nothing is logged as an error."""
    headers = {"Content-Type": "multipart/form-data; boundary=B"}
    async with http.post(f"{service.url}/v1/images/{path}", data=body, headers=headers) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
