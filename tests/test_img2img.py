"""Image-to-image, inpainting and n images per request, over real NATS with the tiny-sdxl worker of the
session: through mflux-server's API, the native API, a NATS publisher and the Python client; and every
bad upload refused with a 400 naming the field."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import uuid
import zlib

import msgpack
import nats
import numpy as np
import pytest
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError, ObjectNotFoundError
from PIL import Image

from gateway.http.auth import new_key_entry
from gateway.core.service import idempotent_job_id
from gateway.settings import GatewaySettings
from imagegen import runtime
from imagegen.client import AsyncClient, ImagegenError, Progress
from schemas import jobstore, names
from schemas.codec import decode, encode
from schemas.jetstream import Topology
from schemas.job import JobEnvelope, Placement
from schemas.request import Limits, parse_request
from schemas.status import JobState, JobStatus, UploadRef
from tests.helpers.images import b64, encoded, finished, generated, image_of, pixels, queue
from tests.helpers.service import collect_events, wait_status

RED, BLUE = (210, 40, 30), (30, 60, 220)


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def stripes(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A picture with structure, so that a pixel kept in place can be told from one redrawn."""
    x = np.arange(size[0])[None, :, None]
    y = np.arange(size[1])[:, None, None]
    pixels = np.concatenate([(x * 4) % 256 + 0 * y, (y * 4) % 256 + 0 * x, ((x + y) * 2) % 256], axis=2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def centre_mask(size: tuple[int, int] = (64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return mask


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: opening it is cheap,
    decoding it would fail (or, were the data all there, take gigabytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def ico_bomb(side: int = 13000) -> bytes:
    """An ICO holding a PNG of side x side pixels (1-bit, all zeros: about 30 KB here), the shape of
    the 13000x13000 icon that PIL decodes inside Image.open."""
    row = b"\0" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


async def upload_exists(nats_url: str, name: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        await (await nc.jetstream().object_store(names.UPLOADS_BUCKET)).get_info(name)
        return True
    except ObjectNotFoundError:
        return False
    finally:
        await nc.close()


# -- image-to-image ---------------------------------------------------------------------------------


async def test_img2img_output_depends_on_the_init_image(service, http):
    body = {"prompt": "a barn", "seed": 11, "steps": 6, "strength": 0.5, "format": "PNG"}
    job, from_red = await generated(http, service.url, {**body, "init_image": b64(solid(RED))})
    _, from_blue = await generated(http, service.url, {**body, "init_image": b64(solid(BLUE))})
    _, from_red_again = await generated(http, service.url, {**body, "init_image": f"data:image/png;base64,{b64(solid(RED))}"})
    assert np.abs(from_red - from_blue).mean() > 0.5  # same seed and prompt: only the init image differs
    assert np.array_equal(from_red, from_red_again)  # a data URL is the same image as plain base64
    assert job["total_steps"] == 3 and job["step"] == 3  # int(6 x 0.5) steps run
    assert job["request"]["strength"] == 0.5 and "init_image" not in job["request"]
    assert job["init_image"]["name"] == f"{job['job_id']}/init" and job["init_image"]["width"] == 64


async def test_mflux_generate_with_init_image_takes_its_size_and_reports_each_step(service, http):
    body = {"prompt": "a jetty", "seed": "5", "steps": 8, "init_image": b64(solid(RED, (96, 72)), "JPEG")}
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert "task_ids" not in answer and "group_id" not in answer  # one image: mflux-server's shape
    assert (await wait_status(http, service.url, answer["task_id"]))["status"] == "done"
    assert await upload_exists(service.nats_url, f"{answer['task_id']}/init")
    async with http.get(f"{service.url}/api/image", params={"task_id": answer["task_id"]}) as r:
        assert r.status == 200 and r.content_type == "image/jpeg"
        assert Image.open(io.BytesIO(await r.read())).size == (96, 72)
    assert not await upload_exists(service.nats_url, f"{answer['task_id']}/init")  # deleted with its task

    progress: list[Progress] = []
    async with AsyncClient(url=service.url) as client:
        image = await client.generate(
            "a jetty", seed=5, steps=8, strength=0.75, init_image=solid(BLUE, (100, 50)), width=128, on_progress=progress.append
        )
    assert image.size == (128, 64)  # width given: the height follows the init image's aspect ratio
    assert [p.step for p in progress if p.type == "progress"] == [1, 2, 3, 4, 5, 6]
    assert {p.total for p in progress if p.type == "progress"} == {6}


async def test_refiner_takes_over_image_to_image(service, http):
    body = {"prompt": "a mill", "seed": 3, "steps": 10, "strength": 0.8, "format": "PNG", "init_image": b64(stripes())}
    refined_job, refined = await generated(http, service.url, {**body, "use_refiner": True})
    _, plain = await generated(http, service.url, body)
    assert refined_job["total_steps"] == 8 and refined_job["step"] == 8
    assert refined.shape == plain.shape == (64, 64, 3)
    assert np.abs(refined - plain).mean() > 0.5  # the last steps ran on the refiner


# -- inpainting -------------------------------------------------------------------------------------


async def test_inpainting_keeps_the_pixels_outside_the_mask(service, http):
    init, mask = stripes(), centre_mask()
    body = {"prompt": "a window", "seed": 21, "steps": 4, "strength": 1.0, "format": "PNG"}
    job, out = await generated(http, service.url, {**body, "init_image": b64(init), "mask_image": b64(mask)})
    original = np.asarray(init).astype(np.int16)
    keep = np.asarray(mask) == 0
    assert np.abs(out[keep] - original[keep]).max() <= 2
    assert np.abs(out[~keep] - original[~keep]).mean() > 20  # the masked square is redrawn
    assert job["total_steps"] == 4 and job["mask_image"]["name"] == f"{job['job_id']}/mask"


async def test_inpainting_with_the_refiner_over_the_client(service):
    async with AsyncClient(url=service.url) as client:
        image = await client.generate(
            "a door", seed=8, steps=6, strength=0.9, format="PNG", init_image=encoded(stripes()),
            mask_image=centre_mask(), use_refiner=True,
        )
    out, original, keep = np.asarray(image).astype(np.int16), np.asarray(stripes()).astype(np.int16), np.asarray(centre_mask()) == 0
    assert np.abs(out[keep] - original[keep]).max() <= 2


# -- n images per request ---------------------------------------------------------------------------


async def test_n_three_makes_three_seeded_images_in_a_group(service, http):
    first = await queue(http, service.url, {"prompt": "a kite", "n": 3, "seed": 700, "steps": 3, "width": 64, "height": 64, "format": "PNG"})
    job_ids = first["job_ids"]
    assert len(job_ids) == 3 and first["job_id"] == job_ids[0] and first["group_url"] == f"/v1/groups/{first['group_id']}"
    async with asyncio.timeout(120):
        while True:
            async with http.get(f"{service.url}{first['group_url']}") as r:
                assert r.status == 200
                group = await r.json()
            if group["finished"]:
                break
            await asyncio.sleep(0.05)
    assert group["states"] == {"done": 3} and group["size"] == 3 and group["job_ids"] == job_ids
    assert [job["seed"] for job in group["jobs"]] == [700, 701, 702]
    images = [await image_of(http, service.url, job_id) for job_id in job_ids]
    assert len(set(images)) == 3
    _, alone = await generated(http, service.url, {"prompt": "a kite", "seed": 701, "steps": 3, "width": 64, "height": 64, "format": "PNG"})
    assert np.array_equal(pixels(images[1]), alone)  # the second image is seed + 1's


async def test_mflux_n_lists_every_task_and_shares_one_upload(service, http):
    body = {"prompt": "a dune", "n": 2, "steps": 4, "strength": 0.5, "init_image": b64(solid(RED))}
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    task_ids = answer["task_ids"]
    assert answer["task_id"] == task_ids[0] and len(task_ids) == 2 and answer["group_id"]
    for task_id in task_ids:
        assert (await wait_status(http, service.url, task_id))["status"] == "done"
    upload = f"{answer['group_id']}/init"
    seeds = []
    for task_id in task_ids:
        async with http.get(f"{service.url}/v1/jobs/{task_id}") as r:
            job = await r.json()
        assert job["init_image"]["name"] == upload
        seeds.append(job["seed"])
    assert seeds[1] == seeds[0] + 1
    async with http.get(f"{service.url}/api/image", params={"task_id": task_ids[0]}) as r:  # delete=true
        assert r.status == 200
    assert await upload_exists(service.nats_url, upload)  # the other task still reads it
    async with http.get(f"{service.url}/api/image", params={"task_id": task_ids[1]}) as r:
        assert r.status == 200
    assert not await upload_exists(service.nats_url, upload)  # gone with the group's last job
    async with http.get(f"{service.url}/v1/groups/{answer['group_id']}") as r:
        assert r.status == 404


async def stored_uploads(nats_url: str) -> set[str]:
    nc = await nats.connect(nats_url)
    try:
        return {info.name for info in await (await nc.jetstream().object_store(names.UPLOADS_BUCKET)).list(ignore_deletes=True)}
    except NotFoundError:  # an empty bucket
        return set()
    finally:
        await nc.close()


async def test_a_group_that_cannot_be_queued_whole_leaves_nothing_behind(service, http):
    secret, entry = new_key_entry("two-a-minute", tiers=["normal"], rate_per_minute=2, max_concurrent=10)
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, api_keys=json.dumps([entry])))
    url, headers = f"http://127.0.0.1:{gateway.port}", {"Authorization": f"Bearer {secret}"}
    before = await stored_uploads(service.nats_url)
    body = {"prompt": "three", "n": 3, "steps": 2, "width": 64, "height": 64, "init_image": b64(solid(RED))}
    try:
        async with http.post(f"{url}/v1/jobs", json=body, headers=headers) as r:
            assert r.status == 429, await r.text()  # the third job is over the key's rate
        async with http.get(f"{url}/v1/jobs", headers=headers) as r:
            assert await r.json() == []  # the two queued first are taken back
        assert await stored_uploads(service.nats_url) == before
    finally:
        await gateway.stop()


async def test_client_n_returns_a_list_over_http_and_over_nats(service):
    async with AsyncClient(url=service.url) as client:
        over_http = await client.generate("a reef", n=2, seed=40, steps=2, init_image=solid(BLUE), format="png")
    async with AsyncClient(nats=service.nats_url) as client:
        over_nats = await client.generate("a reef", n=2, seed=40, steps=2, init_image=solid(BLUE), format="png")
        single = await client.generate("a reef", seed=41, steps=2, init_image=solid(BLUE), format="png")
    assert [im.size for im in over_http + over_nats] == [(64, 64)] * 4
    assert over_http[0].tobytes() != over_http[1].tobytes()
    assert [im.tobytes() for im in over_http] == [im.tobytes() for im in over_nats]
    assert isinstance(single, Image.Image) and single.tobytes() == over_nats[1].tobytes()


# -- straight onto NATS -----------------------------------------------------------------------------


async def test_a_nats_publisher_uploads_the_init_image_and_references_it(service):
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    store = await js.object_store(names.UPLOADS_BUCKET)
    await store.put("publisher-a/harbour.png", encoded(stripes((72, 64))))
    request = parse_request({"prompt": "a harbour", "seed": 9, "width": 72, "height": 64, "steps": 5, "strength": 0.6, "format": "PNG"})
    envelope = JobEnvelope.for_request(request, placement=Placement(init_image=UploadRef(name="publisher-a/harbour.png")))
    await js.publish(names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    events = await collect_events(js, envelope.job_id)
    assert events[-1].type == "done", events[-1]
    assert [e.step for e in events if e.type == "progress"] == [1, 2, 3]  # int(5 x 0.6)
    status = decode((await (await js.key_value(names.STATUS_BUCKET)).get(envelope.job_id)).value, JobStatus)
    assert status.state is JobState.DONE and status.total_steps == 3
    assert status.init_image is not None and status.init_image.name == "publisher-a/harbour.png"
    image = Image.open(io.BytesIO((await (await js.object_store(names.IMAGES_BUCKET)).get(envelope.job_id)).data))
    assert image.size == (72, 64)
    await nc.close()


@pytest.mark.parametrize(
    "stored, fragment",
    [
        (None, "not in object store imagegen-uploads"),
        (b"these bytes are no picture", "not an image"),
        (encoded(solid(RED, (2056, 2056))), "pixel budget"),
        (ico_bomb(), "is ICO"),
        (png_claiming(100_000, 100_000), "pixel budget"),
    ],
    ids=["missing", "no-picture", "over-budget", "ico-bomb", "huge-header"],
)
async def test_a_bad_or_missing_upload_fails_the_job_once_with_the_reason(service, stored, fragment):
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    dlq = await js.subscribe(names.DLQ_SUBJECT, deliver_policy=DeliverPolicy.NEW)
    envelope = JobEnvelope.for_request(
        parse_request({"prompt": "a cliff", "width": 64, "height": 64, "steps": 2}),
        placement=Placement(init_image=UploadRef(name=f"publisher-b/{uuid.uuid4().hex}")),
    )
    if stored is not None:
        await (await js.object_store(names.UPLOADS_BUCKET)).put(envelope.init_image.name, stored)
    await js.publish(names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    events = await collect_events(js, envelope.job_id)
    assert events[-1].type == "failed" and events[-1].reason.startswith("init_image:") and fragment in events[-1].reason
    letter = msgpack.unpackb((await dlq.next_msg(timeout=30)).data)
    assert letter["job_id"] == envelope.job_id and letter["attempt"] == 1  # terminated on its first try
    await nc.close()


async def test_a_job_message_carrying_the_image_itself_is_refused(service):
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    inline = {"v": 1, "job_id": "inline-image-0001", "seed": 1, "request": {"prompt": "a", "init_image": b64(solid(RED))}}
    await js.publish(names.Tier.NORMAL.subject, msgpack.packb(inline), headers={names.MSG_ID_HEADER: "inline-image-0001"})
    events = await collect_events(js, "inline-image-0001")
    assert events[-1].type == "failed" and "imagegen-uploads" in events[-1].reason
    await nc.close()


# -- bad uploads ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def strict_gateway(service):
    """A second gateway on the session's NATS with small upload limits."""
    limits = Limits(max_upload_bytes=6000, max_pixels=96 * 96, max_images=4)
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, limits=limits))
    yield f"http://127.0.0.1:{gateway.port}"
    await gateway.stop()


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
BAD_UPLOADS = [
    ({"init_image": "this is not base64!"}, "init_image", "base64"),
    ({"init_image": base64.b64encode(b"plain words, no picture").decode()}, "init_image", "not an image"),
    ({"init_image": "data:text/plain;base64,aGVsbG8="}, "init_image", "text/plain"),
    ({"init_image": "data:image/png,rawbytes"}, "init_image", "base64"),
    ({"init_image": b64(NOISE)}, "init_image", "upload limit of 6000 bytes"),
    ({"init_image": b64(solid(RED, (104, 104)))}, "init_image", "pixel budget"),
    ({"init_image": 12345}, "init_image", "base64"),
    ({"mask_image": b64(centre_mask())}, "mask_image", "init_image"),
    ({"init_image": b64(solid(RED)), "mask_image": b64(centre_mask((32, 32)))}, "mask_image", "same size"),
    ({"init_image": b64(solid(RED)), "mask_image": "%%%"}, "mask_image", "base64"),
    ({"init_image": b64(solid(RED)), "strength": 0}, "strength", "greater than or equal to 0.01"),
    ({"init_image": b64(solid(RED)), "strength": 1e-6}, "strength", "greater than or equal to 0.01"),
    ({"init_image": b64(solid(RED)), "strength": 1.5}, "strength", "less than or equal to 1"),
    ({"n": 5}, "n", "between 1 and 4"),
    ({"n": 0}, "n", "greater than or equal to 1"),
]


@pytest.mark.parametrize("fields, field, fragment", BAD_UPLOADS)
@pytest.mark.parametrize("path", ["/api/generate", "/v1/jobs"])
async def test_bad_uploads_are_400_naming_the_field(strict_gateway, http, path, fields, field, fragment):
    body = {"prompt": "a lake", "width": 64, "height": 64, "steps": 2, **fields}
    async with http.post(f"{strict_gateway}{path}", json=body) as r:
        assert r.status == 400, await r.text()
        answer = await r.json()
    assert answer["field"] == field and fragment in answer["error"], answer


async def test_default_limits_refuse_n_over_eight_and_too_many_pixels(service, http):
    async with http.post(f"{service.url}/v1/jobs", json={"prompt": "a", "n": 9}) as r:
        assert r.status == 400 and (await r.json())["field"] == "n"
    huge = b64(solid(RED, (2056, 2056)))  # a few kilobytes of PNG, 4.2 million pixels
    async with http.post(f"{service.url}/api/generate", json={"prompt": "a", "init_image": huge}) as r:
        assert r.status == 400
        answer = await r.json()
    assert answer["field"] == "init_image" and "pixel budget" in answer["error"]


@pytest.mark.parametrize(
    "picture, fragment",
    [
        (ico_bomb(), "is ICO; this server takes PNG, JPEG or WEBP"),
        (encoded(solid(RED, (8, 8)), "GIF"), "is GIF; this server takes PNG, JPEG or WEBP"),
        (png_claiming(100_000, 100_000), "is 10000000000 pixels, over the pixel budget"),
        (png_claiming(3000, 3000), "is 3000x3000 = 9000000 pixels, over the pixel budget"),
    ],
    ids=["ico-bomb", "gif", "huge-header", "over-budget-header"],
)
@pytest.mark.parametrize("path", ["/api/generate", "/v1/jobs"])
async def test_other_formats_and_huge_headers_are_refused_before_decoding(service, http, path, picture, fragment):
    body = {"prompt": "a bay", "steps": 2, "init_image": base64.b64encode(picture).decode("ascii")}
    async with http.post(f"{service.url}{path}", json=body) as r:
        assert r.status == 400, await r.text()
        answer = await r.json()
    assert answer["field"] == "init_image" and fragment in answer["error"], answer


async def test_openapi_shows_the_new_fields_and_the_group_endpoint(service, http):
    async with http.get(f"{service.url}/openapi.json") as r:
        spec = await r.json()
    fields = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"init_image", "mask_image", "strength", "n"} <= set(fields) and fields["strength"]["default"] == 0.4
    assert "/v1/groups/{group_id}" in spec["paths"]


# -- sizes, bodies and group sizes ------------------------------------------------------------------


async def test_a_size_taken_from_the_init_image_over_the_pixel_budget_is_400(service, http):
    tall = b64(solid(RED, (64, 4096)))  # 262,144 pixels; width 2048 makes the height 4096 (clamped)
    body = {"prompt": "a tower", "width": 2048, "steps": 2, "init_image": tall}
    async with http.post(f"{service.url}/v1/jobs", json=body) as r:
        assert r.status == 400, await r.text()
        answer = await r.json()
    assert answer["field"] == "width" and "2048x4096" in answer["error"] and "pixel budget" in answer["error"]
    async with AsyncClient(nats=service.nats_url) as client:
        with pytest.raises(ImagegenError) as refused:
            await client.submit("a tower", width=2048, steps=2, init_image=solid(RED, (64, 4096)))
    assert refused.value.field == "width" and "pixel budget" in str(refused.value)


async def test_a_body_with_an_init_image_and_a_mask_at_the_upload_limit_is_taken(service, http):
    limits = Limits(max_upload_bytes=40_000)
    gateway = await runtime.start_gateway(
        GatewaySettings(nats_url=service.nats_url, port=0, limits=limits, max_body_bytes=64 * 1024)
    )
    url = f"http://127.0.0.1:{gateway.port}"
    rng = np.random.default_rng(1)
    init, mask = (encoded(Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), "RGB")) for _ in range(2))
    assert 30_000 < len(init) <= 40_000 and 30_000 < len(mask) <= 40_000  # together over the 64 KiB body limit
    body = {"prompt": "a wall", "steps": 2, "strength": 0.5, "init_image": base64.b64encode(init).decode(),
            "mask_image": base64.b64encode(mask).decode()}
    try:
        async with http.post(f"{url}/v1/jobs", json=body) as r:
            assert r.status == 202, await r.text()
            job = await r.json()
        assert job["init_image"]["size"] == len(init) and job["mask_image"]["size"] == len(mask)
        async with http.delete(f"{url}/v1/jobs/{job['job_id']}") as r:
            assert r.status in (200, 204)
    finally:
        await gateway.stop()


async def test_a_job_message_claiming_a_large_group_fails_and_views_stay_small(service, http):
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    request = parse_request({"prompt": "a crowd", "width": 64, "height": 64, "steps": 2})
    over_limit = JobEnvelope.for_request(request, placement=Placement(group_id="big-group-0001", group_size=20))
    await js.publish(names.Tier.NORMAL.subject, encode(over_limit), headers={names.MSG_ID_HEADER: over_limit.job_id})
    events = await collect_events(js, over_limit.job_id)
    assert events[-1].type == "failed" and "group_size: 20" in events[-1].reason, events[-1]

    raw = {"v": 1, "job_id": "huge-group-0001", "seed": 1, "request": {"prompt": "a"}, "group_id": "huge-group",
           "group_size": 10**9}
    await js.publish(names.Tier.NORMAL.subject, msgpack.packb(raw), headers={names.MSG_ID_HEADER: raw["job_id"]})
    events = await collect_events(js, raw["job_id"])
    assert events[-1].type == "failed" and "undecodable" in events[-1].reason and "group_size" in events[-1].reason

    record = JobStatus(job_id="claims-a-million-0", group_id="claims-a-million", group_size=10**6, state=JobState.FAILED)
    await jobstore.create_status(await js.key_value(names.STATUS_BUCKET), record)
    await nc.close()
    async with http.get(f"{service.url}/v1/jobs/claims-a-million-0") as r:
        assert r.status == 200
        view = await r.json()
    assert view["job_ids"][0] == "claims-a-million-0" and len(view["job_ids"]) <= 64


# -- idempotent repeats and the result cache --------------------------------------------------------


async def test_an_idempotent_repeat_with_an_init_image_publishes_a_job_never_published(service, http):
    """A first call stopped after writing job 0's record and storing the image, before publishing job 0
    and before queuing job 1: the repeat publishes the one and queues the other, on the stored image."""
    idempotency_key = f"quay-{uuid.uuid4()}"
    group_id = idempotent_job_id(None, idempotency_key)
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    data = encoded(solid(RED))
    await (await js.object_store(names.UPLOADS_BUCKET)).put(f"{group_id}/init", data)
    fields = {"prompt": "a quay", "seed": 30, "steps": 2, "strength": 0.5, "width": 64, "height": 64, "format": "PNG"}
    placement = Placement(
        init_image=UploadRef(name=f"{group_id}/init", size=len(data), width=64, height=64),
        group_id=group_id, group_index=0, group_size=2,
    )
    first = JobEnvelope.for_request(parse_request(fields), job_id=f"{group_id}-0", placement=placement)
    await jobstore.create_status(await js.key_value(names.STATUS_BUCKET), first.queued_status())
    await nc.close()

    body = {**fields, "n": 2, "init_image": b64(solid(BLUE))}  # the stored image stands, as the first call sent it
    async with http.post(f"{service.url}/v1/jobs", json=body, headers={"Idempotency-Key": idempotency_key}) as r:
        assert r.status == 202, await r.text()
        answer = await r.json()
    assert answer["job_ids"] == [f"{group_id}-0", f"{group_id}-1"]
    jobs = [await finished(http, service.url, job_id, timeout=60) for job_id in answer["job_ids"]]
    assert [job["state"] for job in jobs] == ["done", "done"], jobs
    assert [job["seed"] for job in jobs] == [30, 31]
    assert {job["init_image"]["name"] for job in jobs} == {f"{group_id}/init"}


async def test_unseeded_groups_stay_out_of_the_result_cache(service, http):
    body = {"prompt": "a moth at night", "n": 2, "steps": 2, "width": 64, "height": 64, "format": "PNG"}
    group = await queue(http, service.url, body)
    jobs = [await finished(http, service.url, job_id) for job_id in group["job_ids"]]
    assert [job["state"] for job in jobs] == ["done", "done"]
    again = await queue(http, service.url, {**body, "n": 1, "seed": jobs[1]["seed"]})
    job = await finished(http, service.url, again["job_id"])
    assert job["state"] == "done" and job["cached"] is False  # made again: the group's seed was never the caller's


# -- taking back ------------------------------------------------------------------------------------


async def test_uploads_stored_before_a_failed_store_are_removed(broker, http):
    gateway = await runtime.start_gateway(
        GatewaySettings(nats_url=broker.url, port=0, topology=Topology(uploads_max_bytes=20_000))
    )
    url = f"http://127.0.0.1:{gateway.port}"
    rng = np.random.default_rng(2)
    init, mask = (encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")) for _ in range(2))
    assert len(init) < 20_000 < len(init) + len(mask)  # the bucket takes the init image, not the mask as well
    body = {"prompt": "a gate", "steps": 2, "init_image": base64.b64encode(init).decode(), "mask_image": base64.b64encode(mask).decode()}
    try:
        async with http.post(f"{url}/v1/jobs", json=body) as r:
            assert r.status == 507, await r.text()
            assert "imagegen-uploads" in (await r.json())["error"]
        assert await stored_uploads(broker.url) == set()
    finally:
        await gateway.stop()


async def test_an_idempotent_group_repeated_over_the_rate_limit_keeps_its_jobs(service, http):
    secret, entry = new_key_entry(f"three-a-minute-{uuid.uuid4().hex[:8]}", tiers=["normal"], rate_per_minute=3, max_concurrent=10)
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, api_keys=json.dumps([entry])))
    url = f"http://127.0.0.1:{gateway.port}"
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "order-7"}
    body = {"prompt": "twice", "n": 2, "seed": 5, "steps": 2, "width": 64, "height": 64}
    try:
        answers = []
        for _ in range(3):  # the first call spends two of the three a minute; repeats spend none
            async with http.post(f"{url}/v1/jobs", json=body, headers=headers) as r:
                assert r.status == 202, await r.text()
                answers.append(await r.json())
        assert answers[0]["job_ids"] == answers[1]["job_ids"] == answers[2]["job_ids"]
        for job_id in answers[0]["job_ids"]:
            async with http.get(f"{url}/v1/jobs/{job_id}", headers=headers) as r:
                assert r.status == 200, await r.text()
    finally:
        await gateway.stop()
