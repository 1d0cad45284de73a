"""Screenshots of the web UI for the README.

Starts the service as `imagegen up` does on a machine without a GPU (an embedded nats-server, a gateway
and a tiny-sdxl worker; previews every 2 steps so that they show), drives the page in headless
Chromium (Debian's `chromium`, through Playwright) and saves PNGs:

    python docs/screenshots.py [--out docs/screenshots] [--data-dir DIR]

generating.png: a batch in progress (queue positions, ETAs, progress bars, live previews) above a
gallery; gallery.png: the finished gallery with its download / re-run / edit actions; img2img.png: a
gallery image taken as the init image, with strength and an inpainting mask, and the variations made
from it; phone.png: the page 390 px wide after a reload (the gallery is back) with a form error shown
below its field and Generate at the bottom of the screen.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from playwright.async_api import Page, async_playwright, expect

from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from imagegen import runtime
from imagegen.embedded_nats import EmbeddedNats, free_port
from imagegen.paths import default_data_dir

MAX_BYTES = 300_000
WAIT_MS = 180_000
VIEWPORT = {"width": 1366, "height": 768}  # a common laptop screen: Generate must show on it
PHONE = {"width": 390, "height": 844}


async def generate(
    page: Page,
    prompt: str,
    *,
    negative: str | None = None,
    size: str | None = None,
    steps: str = "",
    seed: str = "",
    count: str = "1",
    image_format: str | None = None,
) -> None:
    """Fills the web UI's form and presses Generate; a field given as None is left as the page has it.
    The web UI's browser tests fill the form with this too."""
    await page.fill("#prompt", prompt)
    if negative is not None:
        await page.fill("#negative_prompt", negative)
    if size is not None:
        await page.select_option("#size", size)
    await page.fill("#steps", steps)
    await page.fill("#seed", seed)
    await page.fill("#count", count)
    if image_format is not None:
        await page.select_option("#format", image_format)
    await page.click("#generate")


async def wait_gallery(page: Page, images: int) -> None:
    await page.wait_for_function(
        """(n) => { const imgs = [...document.querySelectorAll("#gallery img")];
                    return imgs.length >= n && imgs.every((i) => i.complete && i.naturalWidth > 0); }""",
        arg=images,
        timeout=WAIT_MS,
    )


def circle_mask(size: tuple[int, int]) -> bytes:
    """White (redrawn) disc in the middle, black (kept) around it."""
    mask = Image.new("L", size, 0)
    w, h = size
    ImageDraw.Draw(mask).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def shrink(path: Path) -> None:
    """Keeps a screenshot under MAX_BYTES: a palette of fewer colours until the PNG is small enough."""
    with Image.open(path) as image:
        original = image.convert("RGB")
    for colors in (256, 192, 128, 64):
        if path.stat().st_size <= MAX_BYTES:
            return
        original.quantize(colors=colors, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


async def shoot(url: str, out: Path) -> list[Path]:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not on PATH: apt-get install -y chromium")
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium)
        page = await browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"{url}/")
        await expect(page.locator("#model")).to_have_text("tiny-sdxl", timeout=WAIT_MS)

        await generate(page, "a lighthouse at dawn, oil painting, warm light", negative="blurry, low quality",
                       size="256x256", steps="12", seed="2024", count="4")
        await wait_gallery(page, 4)

        await generate(page, "a red fox in fresh snow, golden hour, 35mm photo", negative="blurry",
                       size="512x512", steps="40", seed="90210", count="3")
        await page.wait_for_function(
            """() => { const cards = [...document.querySelectorAll("#jobs .job")];
                       const running = cards.find((c) => c.dataset.state === "running");
                       const queued = cards.filter((c) => c.dataset.state === "queued");
                       if (!running || queued.length < 2) return false;
                       const m = running.querySelector(".where").textContent.match(/step (\\d+)\\/(\\d+)/);
                       return m && Number(m[1]) >= 14 && !running.querySelector("img.preview").hidden; }""",
            timeout=WAIT_MS,
        )
        saved.append(out / "generating.png")
        await page.wait_for_timeout(300)
        await page.screenshot(path=str(saved[-1]))

        await wait_gallery(page, 7)
        await page.mouse.move(0, 0)
        await page.wait_for_timeout(800)  # the newest card's fade-in
        await page.evaluate(
            """() => { const head = document.getElementById("gallery").previousElementSibling;
                       window.scrollTo(0, head.getBoundingClientRect().top + window.scrollY - 90); }"""
        )
        saved.append(out / "gallery.png")
        await page.screenshot(path=str(saved[-1]))

        await page.locator('#gallery figure[data-seed="2024"] button.use-init').click()
        await expect(page.locator("#init-name")).to_have_text("imagegen-2024-256x256.jpg")
        await page.eval_on_selector("#strength", "el => { el.value = '0.6'; el.dispatchEvent(new Event('input')); }")
        await page.set_input_files("#mask-file", {"name": "circle-mask.png", "mimeType": "image/png", "buffer": circle_mask((256, 256))})
        await generate(page, "a lighthouse at dawn, a new sky", negative="blurry", size="init", steps="12", seed="7", count="2")
        await wait_gallery(page, 9)
        await page.evaluate(
            """() => { window.scrollTo(0, 0);
                       const panel = document.querySelector(".form-panel");
                       panel.scrollTop = document.getElementById("init-drop").offsetTop - 150; }"""
        )
        await page.mouse.move(0, 0)
        await page.wait_for_timeout(800)
        await page.locator('#gallery figure[data-seed="7"] .frame').hover()
        await page.wait_for_timeout(300)
        saved.append(out / "img2img.png")
        await page.screenshot(path=str(saved[-1]))
        storage = await page.context.storage_state()  # the phone is the same browser: its recent images come back

        phone_context = await browser.new_context(viewport=PHONE, is_mobile=True, storage_state=storage)
        phone = await phone_context.new_page()
        phone.set_default_timeout(WAIT_MS)
        await phone.goto(f"{url}/")
        await expect(phone.locator("#model")).to_have_text("tiny-sdxl", timeout=WAIT_MS)
        await wait_gallery(phone, 9)
        await generate(phone, "a lighthouse at dawn", steps="500")
        await expect(phone.locator(".field-error")).to_be_in_viewport()
        await phone.wait_for_timeout(600)  # the smooth scroll to the field
        saved.append(out / "phone.png")
        await phone.screenshot(path=str(saved[-1]))
        await browser.close()
    for path in saved:
        shrink(path)
    return saved


async def main(out: Path, data_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as store:
        nats = EmbeddedNats(store_dir=Path(store) / "nats", port=free_port()).start()
        try:
            worker, task = await runtime.start_worker(
                WorkerSettings(nats_url=nats.url, model="tiny-sdxl", device="cpu", data_dir=str(data_dir), preview_every=2)
            )
            gateway = await runtime.start_gateway(GatewaySettings(nats_url=nats.url, port=0))
            try:
                for path in await shoot(f"http://127.0.0.1:{gateway.port}", out):
                    print(f"{path} ({path.stat().st_size // 1000} KB)")
            finally:
                worker.stop()
                await asyncio.wait_for(task, 60)
                await worker.close()
                await gateway.stop()
        finally:
            nats.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "screenshots")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="where tiny-sdxl is built (as imagegen up)")
    args = parser.parse_args()
    asyncio.run(main(args.out, args.data_dir))
