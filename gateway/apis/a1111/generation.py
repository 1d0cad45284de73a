"""AUTOMATIC1111's `POST /sdapi/v1/txt2img` and `POST /sdapi/v1/img2img`.

txt2img makes batch_size x n_iter jobs (seeds seed, seed+1, ...; a random first seed for -1), queued as
one group through `gateway.core.submission` like a native request with `n`, and answers once all are
done with their PNGs in base64, the request as sent (`parameters`) and `info` (`gateway.apis.a1111.info`).
Fields left out take the served model's defaults (`gateway.apis.a1111.fields`). Features this service does
not offer are accepted only at their "off" values, anything else is refused by name, never ignored
(`gateway.apis.a1111.refusals`). `eta` is DDIM's noise, as in A1111 (`gateway.apis.a1111.samplers`).

img2img adds one init image and `denoising_strength` (A1111's 0.75 when absent), and with a `mask`
inpaints (`gateway.apis.a1111.init_image`). Jobs cancelled meanwhile (`gateway.apis.a1111.progress`) are
left out of the answer, as A1111 answers an interrupted batch with the images it made; errors come in
FastAPI's shape (`gateway.apis.a1111.failures`), 504 after WAIT_S."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from aiohttp import web

from gateway.apis.a1111.failures import answered
from gateway.apis.a1111.fields import Generation, generation_of
from gateway.apis.a1111.info import info_of
from gateway.core.caller import SERVICE, caller, tier_for
from gateway.core.service import JobService
from gateway.core.waiting import image_data, until_done
from gateway.http.body import takes_images
from gateway.http.http_errors import read_json
from gateway.http.views.a1111 import A1111Img2ImgRequest, A1111Txt2ImgRequest
from schemas.status import JobState, JobStatus

log = logging.getLogger("imagegen.gateway.a1111")
routes = web.RouteTableDef()

WAIT_S = 600.0


async def run_generation(request: web.Request, kind: type[A1111Txt2ImgRequest]) -> web.Response:
    jobs = request.app[SERVICE]
    body = await read_json(request)
    asked = await generation_of(jobs, body, kind)
    who = caller(request)
    owner = who.get("owner")
    base = asked.base
    if (tier := tier_for(who.get("key"))) is not None:
        base = base.model_copy(update={"tier": tier})
    started = time.monotonic()
    # Jobs cancelled meanwhile (/sdapi/v1/interrupt, /sdapi/v1/skip, DELETE /v1/jobs/{id}) are left out
    # of the answer, as A1111 answers an interrupted batch with the images it made.
    collect = image_collector(jobs, asked, owner)
    finished, images = await until_done(jobs, base, who, collect, wait_s=WAIT_S, keep_cancelled=True)
    info = await info_of(jobs, asked, finished, owner)
    log.info(
        "%s %s: %d done, %d cancelled, in %.1fs, %dx%d", "img2img" if base.init_image else "txt2img",
        ",".join(s.job_id for s in finished), len(info["job_ids"]), len(info["cancelled_job_ids"]),
        time.monotonic() - started, info["width"], info["height"],
    )
    return web.json_response({"images": images, "parameters": body, "info": json.dumps(info)})


def image_collector(jobs: JobService, asked: Generation, owner: str | None):
    """What `until_done` collects once the jobs ended: the images made, base64 PNG (none with send_images
    false), each put back into the init image where only the masked part was inpainted."""

    async def collect(finished: list[JobStatus]) -> list[str]:
        if asked.ask.send_images is False:
            return []
        images = []
        for status in finished:
            if status.state is JobState.DONE:
                data = await image_data(jobs, status.job_id, owner)
                if asked.paste_back is not None:  # only the masked part was made: put it back into the init image
                    data = await asyncio.get_running_loop().run_in_executor(None, asked.paste_back.apply, data)
                images.append(base64.b64encode(data).decode("ascii"))
        return images

    return collect


@routes.post("/sdapi/v1/txt2img")
async def txt2img(request: web.Request) -> web.Response:
    return await answered(lambda r: run_generation(r, A1111Txt2ImgRequest), request)


@routes.post("/sdapi/v1/img2img")
@takes_images
async def img2img(request: web.Request) -> web.Response:
    return await answered(lambda r: run_generation(r, A1111Img2ImgRequest), request)
