"""The web UI at / in a real headless browser (Debian's `chromium`, driven by Playwright), against the
real gateway and a tiny-sdxl worker: a prompt typed (with the refiner on) becomes an image in the
gallery that downloads; several images at once get consecutive seeds and show queue, progress, ETA
and live previews on the way; a waiting card's place moves with the queue; re-run repeats an image from its seed (from the result cache, and made
again without it); with several models served, the page picks one per request; cancel stops a job; the API's 4xx errors are shown by field; the page asks for no
more images per request, and offers no larger sizes, than the service's limits; an uploaded (or
dropped) init image gives an image of its size, a gallery image becomes the next init image, and a
mask of another size is refused naming the mask; and with keys on, the key typed in the page
unlocks it. Also the WebSocket the page follows its jobs over: the first-message key browsers use
(since they cannot set headers on a WebSocket), a cap on sockets still waiting for their key, and a
socket that follows more jobs over its life than it may follow at once."""

from __future__ import annotations

import base64
import io
import json
import secrets
import shutil
import sys
from pathlib import Path

import aiohttp
import nats
import pytest
from PIL import Image
from playwright.async_api import Browser, Page, async_playwright, expect

from gateway.http import auth

from gateway.apis import native as native_api
from gateway.http.auth import new_key_entry
from gateway.settings import GatewaySettings
from imagegen import runtime
from schemas import names
from schemas.codec import encode
from schemas.jetstream import Topology
from schemas.request import Limits
from schemas.workers import WorkerInfo
from tests.helpers.real_processes import wait_state
from tests.helpers.service import Service

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
from screenshots import generate as fill_form  # noqa: E402  (the README's screenshots fill the form the same way)

WAIT_MS = 90_000
expect.set_options(timeout=30_000)  # checks of what is already on the page; a slow CI machine still passes
SMALL = {"prompt": "a cup", "width": 64, "height": 64, "steps": 2}
FINAL = {"done", "failed", "cancelled", "expired"}

# Records, on the page, every value the job cards took while jobs ran (they leave the queue once done):
# from the mutation records themselves, each text put into a card and each value a bar width or a
# preview's src had, not from the cards as they happen to look when the observer runs.
RECORD_CARDS = """() => {
  window.cardRecord = new Set();
  const text = (value) => {
    if (/#\\d+ in queue/.test(value)) cardRecord.add("queue position");
    if (/step \\d+\\/\\d+/.test(value)) cardRecord.add("step");
    if (/ETA \\d/.test(value)) cardRecord.add("eta");
  };
  const width = (style) => {
    const found = /width:\\s*([\\d.]+)%/.exec(style || "");
    if (found && Number(found[1]) > 0 && Number(found[1]) < 100) cardRecord.add("partial progress bar");
  };
  const source = (src) => {
    if ((src || "").startsWith("data:image/jpeg;base64,")) cardRecord.add("preview");
  };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === "childList") {
        for (const node of r.addedNodes) if (node.nodeType === Node.TEXT_NODE) text(node.data);
      } else if (r.type === "characterData") {
        text(r.oldValue);
        text(r.target.data);
      } else if (r.target.matches(".bar > div") && r.attributeName === "style") {
        width(r.oldValue);
        width(r.target.getAttribute("style"));
      } else if (r.target.matches("img.preview") && r.attributeName === "src") {
        source(r.oldValue);
        source(r.target.getAttribute("src"));
      }
    }
  }).observe(document.getElementById("jobs"), {
    subtree: true, childList: true, characterData: true, characterDataOldValue: true,
    attributes: true, attributeOldValue: true,
  });
}"""
JOB_READ = "**/v1/jobs/*"  # GET /v1/jobs/{id}: the page's poll of a job (not its image, not a submit)

IMAGE_LOADED_OR_ERROR = """(selector) => !document.getElementById("error").hidden
  || [...document.querySelectorAll(selector)].some((img) => img.complete && img.naturalWidth > 0)"""


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not on PATH: the web UI tests drive Debian's chromium; install it with "
            "`apt-get install -y chromium` (CI's .ci/run does)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
async def browser() -> Browser:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path())
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser) -> Page:
    context = await browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    script_errors: list[str] = []
    page.on("pageerror", lambda exc: script_errors.append(str(exc)))
    yield page
    await context.close()
    assert not script_errors, f"the page raised: {script_errors}"


@pytest.fixture(scope="module")
async def keyed(service: Service):
    """A second gateway on the same broker (so the session's worker runs its jobs), with one key."""
    secret, entry = new_key_entry("studio", tiers=["normal", "low"], rate_per_minute=1000, max_concurrent=50)
    other_secret, other = new_key_entry("others", tiers=["normal"], rate_per_minute=1000, max_concurrent=50)
    gateway = await runtime.start_gateway(
        GatewaySettings(nats_url=service.nats_url, port=0, api_keys=json.dumps([entry, other]))
    )
    yield f"http://127.0.0.1:{gateway.port}", secret, other_secret
    await gateway.stop()


async def open_ui(page: Page, url: str, *, model: str = "tiny-sdxl") -> None:
    await page.goto(f"{url}/")
    await expect(page.locator("#model")).to_have_text(model, timeout=WAIT_MS)


def png(size: tuple[int, int], colour: tuple[int, int, int] | int = (40, 120, 200), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def png_file(name: str, size: tuple[int, int], **kwargs) -> dict:
    """A file for Playwright's set_input_files."""
    return {"name": name, "mimeType": "image/png", "buffer": png(size, **kwargs)}


DROP_FILE = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type: "image/png" }));
  const prompt = document.getElementById("prompt");
  for (const type of ["dragenter", "dragover", "drop"]) {
    prompt.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
  }
}"""


DROP_GALLERY_IMAGE = """(seed) => {
  const img = document.querySelector(`#gallery figure[data-seed="${seed}"] img`);
  const transfer = new DataTransfer();
  transfer.setData("text/uri-list", img.src);
  document.getElementById("form").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
}"""


async def generate(page: Page, prompt: str, *, size: str | None = "64x64", steps: str = "2", image_format: str = "JPEG", **fields) -> None:
    """Fills the form and presses Generate; size None leaves the size as the page chose it."""
    await fill_form(page, prompt, size=size, steps=steps, image_format=image_format, **fields)


async def hold_back_polls(route) -> None:
    """Refuses the page's polls of a job, so that only the WebSocket's events move its cards."""
    if route.request.method == "GET":
        await route.abort()
    else:
        await route.continue_()


async def image_bytes(http: aiohttp.ClientSession, url: str, job_id: str) -> bytes:
    async with http.get(f"{url}/v1/jobs/{job_id}/image") as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def gallery_image(page: Page, seed: str) -> dict:
    """Waits for the gallery image of this seed to load; its natural size."""
    selector = f'#gallery figure[data-seed="{seed}"] img'
    await page.wait_for_function(IMAGE_LOADED_OR_ERROR, arg=selector, timeout=WAIT_MS)
    assert await page.locator("#error").is_hidden(), await page.locator("#error").inner_text()
    return await page.eval_on_selector(selector, "img => ({width: img.naturalWidth, height: img.naturalHeight})")


async def test_a_prompt_becomes_an_image_that_downloads(service, page):
    await open_ui(page, service.url)
    await expect(page.locator("#model-note")).to_contain_text("draws noise")
    await page.locator('label[for="use_refiner"]').click()
    await expect(page.locator("#use_refiner")).to_be_checked()
    await generate(page, "a red bicycle leaning on a wall", seed="1234", steps="4")

    assert await gallery_image(page, "1234") == {"width": 64, "height": 64}
    figure = page.locator('#gallery figure[data-seed="1234"]')
    await expect(figure.locator("figcaption")).to_contain_text("a red bicycle leaning on a wall")
    await expect(figure.locator(".params")).to_contain_text("seed 1234")
    await expect(figure.locator(".params")).to_contain_text("64×64")
    await expect(figure.locator(".params")).to_contain_text("refiner")

    async with page.expect_download(timeout=WAIT_MS) as download_info:
        await figure.locator("a.download").click()
    download = await download_info.value
    assert download.suggested_filename == "imagegen-1234-64x64.jpg"
    with open(await download.path(), "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
    assert image.format == "JPEG" and image.size == (64, 64)


async def test_two_images_at_once_with_live_progress_and_a_rerun_of_one_seed(service, page, http):
    await open_ui(page, service.url)
    await page.route(JOB_READ, hold_back_polls)  # every event reaches the cards: none is skipped by a poll
    await page.evaluate(RECORD_CARDS)
    await generate(page, "two lanterns", seed="777", count="2", steps="6", image_format="PNG")

    await gallery_image(page, "777")
    await gallery_image(page, "778")
    await expect(page.locator("#gallery-count")).to_have_text("2 images")
    await expect(page.locator("#jobs .job")).to_have_count(0)  # finished jobs leave the queue
    recorded = set(await page.evaluate("[...window.cardRecord]"))
    assert recorded == {"queue position", "step", "eta", "partial progress bar", "preview"}
    await page.unroute(JOB_READ)

    async with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as answered:
        await page.locator('#gallery figure[data-seed="777"] button.rerun').click()
    rerun = await answered.value
    assert (await rerun.json())["cached"] is True  # the same seed and settings: answered from the result cache
    await expect(page.locator('#gallery figure[data-seed="777"]')).to_have_count(2, timeout=WAIT_MS)
    await page.wait_for_function(
        """() => [...document.querySelectorAll('#gallery figure[data-seed="777"] img')]
                 .every((img) => img.complete && img.naturalWidth > 0)""",
        timeout=WAIT_MS,
    )
    same_seed, other_seed = await page.evaluate(
        """async () => {
          const bytes = async (img) => new Uint8Array(await (await fetch(img.src)).arrayBuffer()).join(",");
          const [a, b] = [...document.querySelectorAll('#gallery figure[data-seed="777"] img')];
          const c = document.querySelector('#gallery figure[data-seed="778"] img');
          const [x, y, z] = await Promise.all([bytes(a), bytes(b), bytes(c)]);
          return [x === y, x === z];
        }"""
    )
    assert same_seed and not other_seed

    made = await page.locator('#gallery figure[data-seed="777"]').last.get_attribute("data-job-id")
    again = {**rerun.request.post_data_json, "cache": False}  # the re-run's request, made again on the worker
    async with http.post(f"{service.url}/v1/jobs", json=again) as r:
        assert r.status == 202, await r.text()
        job_id = (await r.json())["job_id"]
    job = await wait_state(http, service.url, job_id, FINAL, timeout=120)
    assert job["state"] == "done" and job["cached"] is False and job["worker"] and job["seed"] == 777
    assert await image_bytes(http, service.url, job_id) == await image_bytes(http, service.url, made)


async def test_a_waiting_cards_place_moves_with_the_queue_over_the_websocket(broker, page, http):
    """No worker: three images wait. As the jobs ahead leave the queue (cancelled over the API), the last
    card's place moves from the WebSocket's events alone (the page's polls are refused)."""
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        await open_ui(page, url, model="no worker running")
        await page.route(JOB_READ, hold_back_polls)
        async with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as answered:
            await generate(page, "three lamps", seed="40", count="3")
        first, second, third = (await (await answered.value).json())["job_ids"]
        place = page.locator(f'#jobs .job[data-job-id="{third}"] .where')
        await expect(place).to_have_text("#3 in queue")
        for ahead, shown in ((first, "#2 in queue"), (second, "#1 in queue")):
            async with http.post(f"{url}/v1/jobs/{ahead}/cancel") as r:
                assert r.status == 200
            await expect(place).to_have_text(shown)
    finally:
        await gateway.stop()


async def test_with_several_models_served_the_page_picks_one_per_request(broker, page):
    """Two models in the registry (one with a refiner), no worker taking jobs: the page offers both,
    shows what the chosen one has, and the request names it."""
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=Topology(worker_ttl_s=600)))
    url = f"http://127.0.0.1:{gateway.port}"
    nc = await nats.connect(broker.url)
    try:
        registry = await nc.jetstream().key_value(names.WORKERS_BUCKET)
        for model, steps, refiner in (("alpha", 20, False), ("beta", 7, True)):
            info = WorkerInfo(worker_id=f"{model}-1", model=model, default_steps=steps, default_guidance=5.0, has_refiner=refiner)
            await registry.put(info.worker_id, encode(info))
        await page.goto(f"{url}/")
        select = page.locator("#model-select")
        await expect(select).to_be_visible()
        await expect(select.locator("option")).to_have_text(["alpha", "beta"])
        await expect(page.locator("#model")).to_be_hidden()
        await select.select_option("beta")
        await expect(page.locator("#steps")).to_have_attribute("placeholder", "default (7)")
        await expect(page.locator("#use_refiner")).to_be_enabled()
        async with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as answered:
            await generate(page, "a model of a harbour", seed="5")
        response = await answered.value
        assert response.request.post_data_json["model"] == "beta"
        assert (await response.json())["request"]["model"] == "beta"
        await select.select_option("alpha")
        await expect(page.locator("#use_refiner")).to_be_disabled()
        await expect(page.locator("#steps")).to_have_attribute("placeholder", "default (20)")
    finally:
        await nc.close()
        await gateway.stop()


async def test_cancel_stops_a_job(service, page):
    await open_ui(page, service.url)
    await generate(page, "a very long job", size="512x512", steps="100", seed="31337")
    card = page.locator("#jobs .job").first
    await card.locator("button.cancel").click()
    await expect(card.locator(".badge")).to_have_text("cancelled", timeout=WAIT_MS)
    await expect(card.locator("button.dismiss")).to_be_visible()
    assert (await card.inner_text()).lower().count("cancelled") == 1, await card.inner_text()  # the badge says it once
    assert await page.locator("#gallery figure").count() == 0
    await card.locator("button.dismiss").click()
    await expect(page.locator("#jobs .job")).to_have_count(0)


async def test_api_errors_are_shown_by_field(service, page):
    await open_ui(page, service.url)
    await generate(page, "too many steps", steps="500")
    await expect(page.locator("#error")).to_contain_text("Steps: must be between 1 and 100, got 500")
    await expect(page.locator("#error")).to_contain_text("The request was refused")
    await expect(page.locator("#steps")).to_have_class("invalid")

    await generate(page, "   ")
    await expect(page.locator("#error")).to_contain_text("Prompt: must not be empty")
    await expect(page.locator("#prompt")).to_have_class("invalid")

    await generate(page, "a cup", count="0")
    await expect(page.locator("#error")).to_contain_text("Images: must be a whole number from 1 to 16")
    assert await page.locator("#jobs .job").count() == 0


async def test_an_init_image_gives_an_image_of_its_size_and_a_result_becomes_the_next_init_image(service, page):
    await open_ui(page, service.url)
    await expect(page.locator("#init-options")).to_be_hidden()
    await page.set_input_files("#init-file", png_file("start.png", (96, 64)))

    await expect(page.locator("#init-thumb")).to_be_visible()
    await expect(page.locator("#init-name")).to_have_text("start.png")
    await expect(page.locator("#init-size")).to_contain_text("96 × 64")
    await expect(page.locator("#size")).to_have_value("init")  # the default with an init image: no width/height sent
    await expect(page.locator('#size option[value="init"]')).to_have_text("As init image")
    await expect(page.locator("#size-note")).to_have_text("96 × 64")
    await expect(page.locator("#strength")).to_be_visible()
    await expect(page.locator("#strength")).to_have_value("0.4")
    await expect(page.locator("#mask-note")).to_contain_text("same size as the init image")
    await expect(page.locator("#mask-note")).to_contain_text("white areas are redrawn")

    await generate(page, "a lighthouse, repainted", size=None, seed="5150", steps="4")
    assert await gallery_image(page, "5150") == {"width": 96, "height": 64}
    figure = page.locator('#gallery figure[data-seed="5150"]')
    await expect(figure.locator(".params")).to_contain_text("96×64")
    await expect(figure.locator(".params")).to_contain_text("image-to-image")
    await expect(figure.locator(".params")).to_contain_text("4 steps at strength 0.4: 1 run")  # int(4 x 0.4) steps ran
    await expect(figure.locator(".frame .mode")).to_have_text("img2img")

    await page.locator("#init-remove").click()  # the form goes back to text-to-image
    await expect(page.locator("#init-set")).to_be_hidden()
    await expect(page.locator("#init-options")).to_be_hidden()
    await expect(page.locator('#size option[value="init"]')).to_have_count(0)

    await figure.locator("button.use-init").click()  # variations: the result is the next init image
    await expect(page.locator("#init-thumb")).to_be_visible()
    await expect(page.locator("#init-name")).to_have_text("imagegen-5150-96x64.jpg")
    await expect(page.locator("#init-size")).to_contain_text("96 × 64")
    thumb = await page.eval_on_selector(
        "#init-thumb", "img => ({src: img.src.slice(0, 23), width: img.naturalWidth, height: img.naturalHeight})"
    )
    assert thumb == {"src": "data:image/jpeg;base64,", "width": 96, "height": 64}

    await page.eval_on_selector("#strength", "el => { el.value = '0.8'; el.dispatchEvent(new Event('input', {bubbles: true})); }")
    await expect(page.locator("#strength-value")).to_have_text("0.8")
    await generate(page, "a lighthouse, a variation", size="64x64", seed="5151", steps="4")  # a preset size still applies
    assert await gallery_image(page, "5151") == {"width": 64, "height": 64}
    variation = page.locator('#gallery figure[data-seed="5151"] .params')
    await expect(variation).to_contain_text("image-to-image")
    await expect(variation).to_contain_text("4 steps at strength 0.8: 3 run")


async def test_a_mask_of_another_size_is_refused_naming_the_mask(service, page):
    await open_ui(page, service.url)
    await page.evaluate(DROP_FILE, ["dropped.png", base64.b64encode(png((96, 64))).decode()])  # dropped onto the form
    await expect(page.locator("#init-name")).to_have_text("dropped.png")
    await expect(page.locator("#init-size")).to_contain_text("96 × 64")

    await page.set_input_files("#mask-file", png_file("mask.png", (64, 64), colour=255, mode="L"))
    await expect(page.locator("#mask-thumb")).to_be_visible()
    await expect(page.locator("#mask-note")).to_contain_text("they must be the same size")
    await generate(page, "a masked cup", size=None, seed="6060")
    await expect(page.locator("#error")).to_contain_text("The request was refused")
    await expect(page.locator("#error")).to_contain_text("Mask: is 64x64, but the init image is 96x64")
    await expect(page.locator("#mask-drop")).to_have_class("upload invalid")
    assert await page.locator("#jobs .job").count() == 0

    await page.set_input_files("#mask-file", png_file("mask.png", (96, 64), colour=255, mode="L"))
    await expect(page.locator("#mask-drop")).not_to_have_class("upload invalid")
    await generate(page, "a masked cup", size=None, seed="6060")
    assert await gallery_image(page, "6060") == {"width": 96, "height": 64}
    await expect(page.locator('#gallery figure[data-seed="6060"] .params')).to_contain_text("inpainting")

    await page.set_input_files("#init-file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"})
    await generate(page, "a broken start", size=None)
    await expect(page.locator("#error")).to_contain_text("Init image: not an image PIL can read")
    await expect(page.locator("#init-drop")).to_have_class("upload invalid")

    await page.evaluate(DROP_GALLERY_IMAGE, "6060")  # a gallery image dragged onto the form
    await expect(page.locator("#init-name")).to_have_text("imagegen-6060-96x64.jpg")
    await expect(page.locator("#init-drop")).to_have_class("upload")


async def test_with_keys_on_the_key_field_unlocks_the_page(keyed, page):
    url, secret, _ = keyed
    await open_ui(page, url, model="enter an API key")
    await generate(page, "no key yet")
    await expect(page.locator("#error")).to_contain_text("an API key is required")

    await page.fill("#api-key", secret)
    await expect(page.locator("#model")).to_have_text("tiny-sdxl", timeout=WAIT_MS)
    await generate(page, "a key was given", seed="4242", steps="6")
    assert await gallery_image(page, "4242") == {"width": 64, "height": 64}
    await expect(page.locator("#live")).to_have_text("live")  # the socket took the key and stayed open

    await page.reload()
    await expect(page.locator("#api-key")).to_have_value(secret)  # kept in localStorage
    await expect(page.locator("#model")).to_have_text("tiny-sdxl", timeout=WAIT_MS)


async def test_a_socket_without_headers_takes_the_key_as_its_first_message(keyed):
    url, secret, other_secret = keyed
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/jobs", json=SMALL, headers={"X-API-Key": secret}) as r:
            assert r.status == 202, await r.text()
            job_id = (await r.json())["job_id"]

        async with http.ws_connect(f"{url}/v1/jobs/{job_id}/ws") as ws:
            await ws.send_json({"key": secret})
            types = []
            for _ in range(100):
                event = await ws.receive_json(timeout=60)
                types.append(event["type"])
                if event["type"] in ("done", "failed", "cancelled", "expired"):
                    break
        assert types[0] == "queued" and types[-1] == "done"

        async with http.ws_connect(f"{url}/v1/ws") as ws:  # another key does not see this job
            await ws.send_json({"key": other_secret})
            await ws.send_json({"follow": [job_id]})
            assert await ws.receive_json(timeout=30) == {"type": "error", "job_id": job_id, "error": f"unknown job {job_id!r}"}

        for first, error in (({"key": "wrong"}, "unknown API key"), ({"follow": [job_id]}, "an API key is required")):
            async with http.ws_connect(f"{url}/v1/ws") as ws:
                await ws.send_json(first)
                answer = await ws.receive_json(timeout=30)
                assert answer["type"] == "error" and error in answer["error"]
                closing = await ws.receive(timeout=30)
                assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1008

        async with http.get(f"{url}/v1/ws") as r:  # a plain request to the socket path still needs a key
            assert r.status == 401


async def test_the_page_keeps_to_the_services_limits(service, page, http):
    """A gateway that takes at most 2 images per request and 512x512 pixels: 3 images go as 2 + 1, and
    larger sizes cannot be picked."""
    gateway = await runtime.start_gateway(
        GatewaySettings(nats_url=service.nats_url, port=0, limits=Limits(max_images=2, max_pixels=512 * 512))
    )
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with http.get(f"{url}/v1/limits") as r:
            assert r.status == 200
            limits = await r.json()
        assert limits["max_images"] == 2 and limits["max_pixels"] == 512 * 512 and limits["max_steps"] == 100

        sent: list[dict] = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" and r.url.endswith("/v1/jobs") else None)
        await open_ui(page, url)
        await expect(page.locator('#size option[value="768x768"]')).to_be_disabled()
        await expect(page.locator('#size option[value="512x512"]')).to_be_enabled()
        await expect(page.locator("#steps")).to_have_attribute("title", "1 to 100 steps")
        await generate(page, "three cups, two at a time", seed="900", count="3")
        for seed in ("900", "901", "902"):
            assert await gallery_image(page, seed) == {"width": 64, "height": 64}
        assert [(body.get("n", 1), str(body["seed"])) for body in sent] == [(2, "900"), (1, "902")]
    finally:
        await gateway.stop()


async def next_final_event(ws: aiohttp.ClientWebSocketResponse, job_id: str) -> dict:
    """Reads the socket until the final event of `job_id`; no other job's event and no error may come."""
    for _ in range(500):
        event = await ws.receive_json(timeout=60)
        assert event["type"] != "error" and event["job_id"] == job_id, event
        if event["type"] in FINAL:
            return event
    raise AssertionError(f"no final event of {job_id}")


async def test_one_socket_follows_more_jobs_in_its_life_than_it_may_follow_at_once(service, http, monkeypatch):
    """As the page does in a long session: job after job over one socket, each followed to its end;
    with at most 3 unfinished jobs at once, 6 finished ones and an id named 5 times still count as few."""
    monkeypatch.setattr(native_api, "MAX_FOLLOWED", 3)
    request = {**SMALL, "prompt": f"followed one after another {secrets.token_hex(4)}", "seed": 5}
    async with http.post(f"{service.url}/v1/jobs", json=request) as r:
        job_ids = [(await r.json())["job_id"]]
    await wait_state(http, service.url, job_ids[0], FINAL, timeout=120)
    for _ in range(5):  # answered from the result cache: done at once
        async with http.post(f"{service.url}/v1/jobs", json=request) as r:
            job_ids.append((await r.json())["job_id"])

    async with http.ws_connect(f"{service.url}/v1/ws") as ws:
        for job_id in job_ids:
            await ws.send_json({"follow": [job_id]})
            assert (await next_final_event(ws, job_id))["type"] == "done"
        await ws.send_json({"follow": [job_ids[0]] * 5})  # one job, named 5 times: followed (and replayed) once
        assert (await next_final_event(ws, job_ids[0]))["type"] == "done"
        await ws.send_json({"follow": [f"nosuchjob{n}" for n in range(4)]})  # 4 at once: over the limit
        refused = await ws.receive_json(timeout=30)
        assert refused["type"] == "error" and "at most 3 unfinished jobs" in refused["error"]


async def test_sockets_waiting_for_their_key_are_capped(keyed, monkeypatch):
    url, secret, _ = keyed
    monkeypatch.setattr(auth, "MAX_PENDING_SOCKETS", 2, raising=False)
    monkeypatch.setattr(auth, "SOCKET_KEY_WAIT_S", 0.5)
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(f"{url}/v1/ws")
        second = await http.ws_connect(f"{url}/v1/ws")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{url}/v1/ws")
        assert refused.value.status == 503
        async with http.ws_connect(f"{url}/v1/ws", headers={"X-API-Key": secret}) as keyed_socket:  # a header: never waits
            await keyed_socket.send_json({"follow": ["nosuchjob1"]})
            assert (await keyed_socket.receive_json(timeout=30))["job_id"] == "nosuchjob1"

        await first.send_json({"key": secret})  # its key came: its place is free again
        await first.send_json({"follow": ["nosuchjob2"]})
        assert (await first.receive_json(timeout=30))["job_id"] == "nosuchjob2"
        third = await http.ws_connect(f"{url}/v1/ws")

        answer = await second.receive_json(timeout=30)  # one that never sends its key is let go
        assert answer["type"] == "error" and "an API key is required" in answer["error"]
        assert (await second.receive(timeout=30)).data == 1008
        for ws in (first, second, third):
            await ws.close()


async def test_the_hires_fix_toggle_doubles_the_size_and_controlnets_are_offered(service, page):
    await open_ui(page, service.url)
    await expect(page.locator("#controlnet-row")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#controlnet-model option")).to_have_text(["none", "edges"])
    await page.locator('label[for="hires"]').click()
    await generate(page, "a windmill in a field", seed="4321", steps="2")
    assert await gallery_image(page, "4321") == {"width": 128, "height": 128}


# -- a newcomer's screen: a laptop at 1366x768 and a phone 390 px wide ---------------------------------

SCREENS = {"laptop": {"width": 1366, "height": 768}, "phone": {"width": 390, "height": 844}}


@pytest.fixture(params=list(SCREENS))
async def screen(browser, request) -> Page:
    context = await browser.new_context(viewport=SCREENS[request.param], is_mobile=request.param == "phone")
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    script_errors: list[str] = []
    page.on("pageerror", lambda exc: script_errors.append(str(exc)))
    yield page
    await context.close()
    assert not script_errors, f"the page raised: {script_errors}"


async def test_generate_and_each_form_error_stay_in_sight(service, screen):
    page = screen
    await open_ui(page, service.url)
    await expect(page.locator("#live")).to_have_text("live")  # live from the first load, before any job
    await expect(page.locator("#generate")).to_be_in_viewport(ratio=1)

    for field, value, text in (("#count", "0", "Images: must be a whole number from 1 to 16"),
                               ("#steps", "500", "Steps: must be between 1 and 100, got 500")):
        await page.fill("#count", "1")
        await page.fill(field, value)
        await page.click("#generate")
        note = page.locator(".field-error")
        await expect(note).to_have_text(text)  # by the form's label, not the request's field name
        assert await note.evaluate("(p) => p.previousElementSibling.id") == field[1:]  # right below its field
        await expect(note).to_be_in_viewport(ratio=1)
        await expect(page.locator(field)).to_be_in_viewport(ratio=1)
        await expect(page.locator("#error")).to_contain_text(text)
        await expect(page.locator("#error")).to_be_in_viewport(ratio=1)
        await expect(page.locator("#generate")).to_be_in_viewport(ratio=1)
        await page.fill(field, "")
        await expect(note).to_have_count(0)  # editing the field clears its message


async def test_a_fresh_page_shows_this_browsers_recent_images_and_seed_minus_one_is_random(service, page, browser):
    await open_ui(page, service.url)
    await generate(page, "a teapot on a shelf", seed="-1", count="2")
    await expect(page.locator("#gallery figure")).to_have_count(2, timeout=WAIT_MS)
    seeds = await page.locator("#gallery figure").evaluate_all("(fs) => fs.map((f) => f.dataset.seed)")
    assert all(seed.isdigit() for seed in seeds) and abs(int(seeds[0]) - int(seeds[1])) == 1, seeds

    await page.reload()
    await expect(page.locator("#gallery figure")).to_have_count(2, timeout=WAIT_MS)
    assert sorted(await page.locator("#gallery figure").evaluate_all("(fs) => fs.map((f) => f.dataset.seed)")) == sorted(seeds)
    await gallery_image(page, seeds[0])
    await expect(page.locator("#gallery-count")).to_have_text("2 images")

    other = await browser.new_context()  # another browser, no keys: this one's images are not its own
    try:
        stranger = await other.new_page()
        await open_ui(stranger, service.url)
        await expect(stranger.locator("#live")).to_have_text("live")
        assert await stranger.locator("#gallery figure").count() == 0
    finally:
        await other.close()
