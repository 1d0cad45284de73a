"""`imagegen generate "a prompt" -o out.png`: submits, shows progress with the ETA, saves the image."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def bar(step: int, total: int, eta: float | None, width: int = 30) -> str:
    filled = int(width * step / total) if total else 0
    eta_text = f" ETA {eta:5.1f}s" if eta is not None else ""
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total}{eta_text}"


async def generate(args: argparse.Namespace) -> int:
    output = Path(args.output)
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        print(f"error: output: unknown extension {output.suffix!r}; use .png, .jpg or .webp", file=sys.stderr)
        return 2
    body = {"prompt": args.prompt, "format": fmt, "negative_prompt": args.negative_prompt}
    for name in ("width", "height", "steps", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{url}/v1/jobs", json=body) as r:
            job = await r.json()
            if r.status >= 400:
                print(f"error: {job.get('error')}", file=sys.stderr)
                return 1
        job_id = job["job_id"]
        print(f"job {job_id}: position {job.get('position')}, ETA {job.get('eta_s') or 0:.1f}s", file=sys.stderr)
        async with http.ws_connect(f"{url}/v1/jobs/{job_id}/ws") as ws:
            async for message in ws:
                event = message.json()
                kind = event.get("type")
                if kind == "progress":
                    print(bar(event["step"], event["total"], event.get("eta_s")), end="", file=sys.stderr, flush=True)
                elif kind == "queued":
                    print(f"queued at position {event.get('position')}", file=sys.stderr)
                elif kind == "done":
                    print(file=sys.stderr)
                    break
                elif kind in ("failed", "cancelled", "expired", "error"):
                    print(f"\n{kind}: {event.get('reason') or event.get('error')}", file=sys.stderr)
                    return 1
        async with http.get(f"{url}/v1/jobs/{job_id}/image") as r:
            if r.status != 200:
                print(f"error: {(await r.json()).get('error')}", file=sys.stderr)
                return 1
            output.write_bytes(await r.read())
    print(f"saved {output}", file=sys.stderr)
    return 0


def generate_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(generate(args))
    except aiohttp.ClientConnectionError as exc:
        print(f"error: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        return 1
