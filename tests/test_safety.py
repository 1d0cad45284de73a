"""The NSFW output check over real NATS and tiny-sdxl: diffusers' StableDiffusionSafetyChecker with
tiny random weights built here (its concept thresholds set so that it flags every image, or none),
a plug-in checker, the blank and reject policies, and a worker without a checker."""

from __future__ import annotations

import asyncio
import io
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from gateway.settings import GatewaySettings
from gpu_worker.safety import REJECTED, load_safety
from gpu_worker.settings import WorkerSettings
from imagegen import runtime
from imagegen.embedded_nats import EmbeddedNats, free_port
from schemas.jetstream import Topology
from tests.helpers.real_processes import job_state, stored_events, submit, wait_state

TOPOLOGY = Topology(ack_wait_s=10, worker_ttl_s=10)
REQUEST = {
    "prompt": "safety: a quiet street", "seed": 5, "width": 64, "height": 64, "steps": 2, "format": "PNG",
    "cache": False,  # each test's worker makes its own image
}


def build_tiny_safety_checker(path: Path, *, threshold: float) -> Path:
    """A StableDiffusionSafetyChecker with a two-layer CLIP vision tower and random concept embeddings,
    saved with its CLIP image processor. Cosine distances lie in [-1, 1]: a threshold of -2 flags
    every image, one of 2 none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


class FlagEverything:
    """A plug-in checker (`tests.test_safety:flag_everything`)."""

    def check(self, images: list[Image.Image]) -> list[bool]:
        return [True for _ in images]


def flag_everything(settings: WorkerSettings) -> FlagEverything:
    return FlagEverything()


@pytest.fixture(scope="module")
def checkers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("safety")
    return {
        "flags": str(build_tiny_safety_checker(root / "flags", threshold=-2.0)),
        "passes": str(build_tiny_safety_checker(root / "passes", threshold=2.0)),
    }


@pytest.fixture(scope="module")
async def pool(tmp_path_factory):
    """A broker and a gateway of this module's own: each test brings the one worker that takes its jobs."""
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("safety-nats"), port=free_port()).start()
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=server.url, port=0, topology=TOPOLOGY))
    yield server.url, f"http://127.0.0.1:{gateway.port}"
    await gateway.stop()
    server.stop()


@asynccontextmanager
async def worker(nats_url: str, data_dir: Path, **settings):
    started, task = await runtime.start_worker(
        WorkerSettings(nats_url=nats_url, model="tiny-sdxl", refiner=None, device="cpu", data_dir=str(data_dir),
                       heartbeat_s=1.0, topology=TOPOLOGY, **settings),
        warm_up=False,
    )
    try:
        yield started
    finally:
        started.stop()
        await asyncio.wait_for(task, 30)
        await started.close()


async def image_of(http, url: str, job_id: str) -> Image.Image:
    async with http.get(f"{url}/v1/jobs/{job_id}/image") as r:
        assert r.status == 200, await r.text()
        return Image.open(io.BytesIO(await r.read()))


def black(image: Image.Image) -> bool:
    return all(high == 0 for _, high in image.convert("RGB").getextrema())


async def test_a_flagged_image_is_blanked_and_marked(pool, checkers, data_dir, http):
    nats_url, url = pool
    async with worker(nats_url, data_dir, safety_checker=checkers["flags"], nsfw_action="blank"):
        job = await wait_state(http, url, await submit(http, url, REQUEST), {"done", "failed"}, timeout=120)
    assert job["state"] == "done" and job["nsfw"] is True
    image = await image_of(http, url, job["job_id"])
    assert image.size == (64, 64) and black(image)
    async with http.get(f"{url}/api/status", params={"task_id": job["job_id"]}) as r:
        assert await r.json() == {"status": "done", "nsfw": True}


async def test_a_flagged_image_is_rejected_for_good(pool, data_dir, http):
    nats_url, url = pool
    async with worker(nats_url, data_dir, safety_checker="tests.test_safety:flag_everything", nsfw_action="reject"):
        job = await wait_state(http, url, await submit(http, url, REQUEST), {"done", "failed"}, timeout=120)
        assert job["state"] == "failed" and job["error"] == REJECTED and job["attempt"] == 1
        async with http.get(f"{url}/v1/jobs/{job['job_id']}/image") as r:
            assert r.status == 404
        later = await submit(http, url, {**REQUEST, "seed": 6})  # the worker goes on with the next job
        assert (await wait_state(http, url, later, {"done", "failed"}, timeout=120))["error"] == REJECTED
    assert (await job_state(http, url, job["job_id"]))["attempt"] == 1  # never tried again


async def test_an_unflagged_image_is_the_image_a_worker_without_a_check_makes(pool, checkers, data_dir, service, http):
    nats_url, url = pool
    async with worker(nats_url, data_dir, safety_checker=checkers["passes"], nsfw_action="reject"):
        checked = await wait_state(http, url, await submit(http, url, REQUEST), {"done", "failed"}, timeout=120)
    unchecked_id = await submit(http, service.url, REQUEST)
    unchecked = await wait_state(http, service.url, unchecked_id, {"done", "failed"}, timeout=120)
    assert checked["state"] == unchecked["state"] == "done"
    assert checked["nsfw"] is unchecked["nsfw"] is False
    ours, theirs = await image_of(http, url, checked["job_id"]), await image_of(http, service.url, unchecked["job_id"])
    assert not black(ours) and ours.tobytes() == theirs.tobytes()


async def test_with_a_check_no_live_preview_shows_pixels_before_it(pool, data_dir, http):
    """Previews are decoded from the latents before the check could see them: with a checker on, none go out."""
    nats_url, url = pool
    request = {**REQUEST, "steps": 4, "seed": 7}
    async with worker(nats_url, data_dir, safety_checker="tests.test_safety:flag_everything", preview_every=1):
        job = await wait_state(http, url, await submit(http, url, request), {"done", "failed"}, timeout=120)
    assert job["state"] == "done" and job["nsfw"] is True
    types = [event.type for event in await stored_events(nats_url, job["job_id"])]
    assert "progress" in types and "done" in types
    assert "preview" not in types


@pytest.mark.parametrize(
    ("source", "action", "message"),
    [
        ("tests.test_safety:no_such_factory", "blank", "no_such_factory"),
        ("no_such_module.anywhere:factory", "blank", "no_such_module"),
        ("./no-such-checker-folder", "blank", "no safety checker weights"),
        ("tests.test_safety:flag_everything", "hide", "--nsfw-action"),
    ],
)
def test_a_bad_configuration_stops_the_worker_with_a_clear_message(source, action, message):
    with pytest.raises(ValueError, match=message):
        load_safety(WorkerSettings(safety_checker=source, nsfw_action=action), device="cpu")
