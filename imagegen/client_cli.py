"""`imagegen generate "a prompt" -o out.png`: submits through the client, shows progress with the ETA,
saves the image. `--init-image` makes it image-to-image (`--strength`), `--mask-image` inpainting, and
`-n 3` three images with seeds seed, seed+1, seed+2 (out.png, out-2.png, out-3.png). Ctrl-C cancels.
Every error is one line on stderr; exit status 2 for what the caller can fix (the address, a flag, a
request the gateway refuses), 1 when a job fails or the service does, 130 on Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from imagegen.client import AsyncClient, ImagegenError, JobFailed, Progress

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


def bar(step: int, total: int, eta: float | None, width: int = 30) -> str:
    filled = int(width * step / total) if total else 0
    eta_text = f" ETA {eta:5.1f}s" if eta is not None else ""
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total}{eta_text}"


def show(progress: Progress) -> None:
    if progress.type == "queued":
        eta = f", ETA {progress.eta_s:.1f}s" if progress.eta_s is not None else ""
        where = f" at position {progress.position}" if progress.position is not None else ""
        print(f"\rqueued{where}{eta}".ljust(40), end="", file=sys.stderr, flush=True)  # the queue moves: the same line
    elif progress.type == "progress":
        print(bar(progress.step, progress.total, progress.eta_s), end="", file=sys.stderr, flush=True)


def outputs_of(args: argparse.Namespace) -> tuple[list[Path], str]:
    """The files to write (OUTPUT, OUTPUT-2, ...) and the format; raises ValueError naming the flag."""
    chosen = args.format.upper() if getattr(args, "format", None) else None
    if args.output is None:
        output = Path(f"out{EXTENSIONS[chosen or 'PNG']}")
    else:
        output = Path(args.output)
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None and chosen is None:
        raise ValueError(f"-o {output}: unknown extension {output.suffix!r}; use .png, .jpg or .webp, or pass --format")
    if fmt is not None and chosen is not None and fmt != chosen:
        raise ValueError(f"-o {output} is a {fmt} file name but --format is {chosen}; change one")
    n = getattr(args, "n", 1) or 1
    return [output] + [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(2, n + 1)], fmt or chosen


def refused(exc: ImagegenError) -> int:
    """Exit status for an error before any job ran: 2 for what the caller can fix (a bad address or
    flag, a request the gateway refuses), 1 for the service's own trouble (5xx)."""
    return 1 if exc.status is not None and exc.status >= 500 else 2


async def generate(args: argparse.Namespace) -> int:
    try:
        outputs, fmt = outputs_of(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        client = AsyncClient(args.url, api_key=args.api_key)
    except ValueError as exc:
        print(f"error: --url {exc}", file=sys.stderr)
        return 2
    async with client:
        try:
            job_ids = await client.submit_many(
                args.prompt, n=len(outputs), width=args.width, height=args.height, steps=args.steps, seed=args.seed,
                negative_prompt=args.negative_prompt or None, format=fmt, init_image=getattr(args, "init_image", None),
                mask_image=getattr(args, "mask_image", None), strength=getattr(args, "strength", None),
                model=getattr(args, "model", None), tier=getattr(args, "tier", None),
                guidance=getattr(args, "guidance", None), scheduler=getattr(args, "scheduler", None),
            )
        except ImagegenError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return refused(exc)
        listed = ", ".join(job_ids)
        print(f"job {listed}", file=sys.stderr)
        try:
            await client.wait_all(job_ids, on_progress=show)
            images = [await client.image_bytes(one) for one in job_ids]
        except JobFailed as exc:
            print(f"\n{exc.state}: {exc.reason}", file=sys.stderr)
            return 1
        except ImagegenError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        except asyncio.CancelledError:
            print(f"\ninterrupted; cancelling job {listed}", file=sys.stderr)
            for one in job_ids:
                try:
                    await asyncio.shield(client.cancel(one))
                except ImagegenError:
                    pass
            raise
    print(file=sys.stderr)
    for path, data in zip(outputs, images):
        path.write_bytes(data)
        print(f"saved {path}", file=sys.stderr)
    return 0


def generate_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(generate(args))
    except KeyboardInterrupt:
        return 130
