"""`imagegen generate "a prompt" -o out.png`: submits through the client, shows progress with the ETA,
saves the image. Ctrl-C cancels the job."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from imagegen.client import AsyncClient, ImagegenError, JobFailed, Progress

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def bar(step: int, total: int, eta: float | None, width: int = 30) -> str:
    filled = int(width * step / total) if total else 0
    eta_text = f" ETA {eta:5.1f}s" if eta is not None else ""
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total}{eta_text}"


def show(progress: Progress) -> None:
    if progress.type == "queued":
        eta = f", ETA {progress.eta_s:.1f}s" if progress.eta_s is not None else ""
        where = f" at position {progress.position}" if progress.position is not None else ""
        print(f"queued{where}{eta}", file=sys.stderr)
    elif progress.type == "progress":
        print(bar(progress.step, progress.total, progress.eta_s), end="", file=sys.stderr, flush=True)


async def generate(args: argparse.Namespace) -> int:
    output = Path(args.output)
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        print(f"error: output: unknown extension {output.suffix!r}; use .png, .jpg or .webp", file=sys.stderr)
        return 2
    async with AsyncClient(args.url, api_key=args.api_key) as client:
        try:
            job_id = await client.submit(
                args.prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed,
                negative_prompt=args.negative_prompt or None, format=fmt,
            )
        except ImagegenError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"job {job_id}", file=sys.stderr)
        try:
            await client.wait(job_id, on_progress=show)
            data = await client.image_bytes(job_id)
        except JobFailed as exc:
            print(f"\n{exc.state}: {exc.reason}", file=sys.stderr)
            return 1
        except ImagegenError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        except asyncio.CancelledError:
            print(f"\ninterrupted; cancelling job {job_id}", file=sys.stderr)
            try:
                await asyncio.shield(client.cancel(job_id))
            except ImagegenError:
                pass
            raise
    print(file=sys.stderr)
    output.write_bytes(data)
    print(f"saved {output}", file=sys.stderr)
    return 0


def generate_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(generate(args))
    except KeyboardInterrupt:
        return 130
