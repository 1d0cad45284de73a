"""Hostile requests against one gateway process, and what one well-behaved client sees meanwhile.

For each hostile class, a few attacking clients (in another process, so their own work does not slow
the measuring client) send it over and over for `--duration` seconds while one client polls
`/healthz` back to back; the table gives that client's p50/p99/max latency, the gateway's peak RSS
and the answers the attackers got. Targets: `/healthz` p99 <= 100 ms, gateway RSS <= 300 MB.

Classes:
- none: no attack, the same polls: the floor this machine gives.
- huge-keys: an 18 MB JSON object of 1.5 million unknown keys, to POST /v1/jobs.
- gzip-bomb: about 300 KB of gzip that inflates to 300 MB of spaces, to POST /v1/jobs.
- ico-bomb: an init image that is an ICO holding a 13000x13000 PNG, to POST /v1/jobs.
- slow-body: 2,100 connections that send their headers, then one body byte a second (`--slow-connections`),
  more than the gateway's default cap of 2,048 open connections.

  python bench/hostile.py                  # about 1 minute
  python bench/hostile.py --only gzip-bomb --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RssSampler, machine, markdown_table, open_stack, positive, summary_ms, whole, write_results  # noqa: E402

CLASSES = ("none", "huge-keys", "gzip-bomb", "ico-bomb", "slow-body")
TARGET_P99_MS = 100.0
TARGET_RSS_MB = 300.0


# -- the hostile bodies ---------------------------------------------------------------------------


def huge_keys(keys: int = 1_500_000) -> bytes:
    return b'{"prompt":"a",' + b",".join(b'"k%d":1' % n for n in range(keys)) + b"}"


def gzip_bomb(mebibytes: int = 300) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * 2**20
    return b"".join(packer.compress(block) for _ in range(mebibytes)) + packer.flush()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ico_bomb(side: int = 13000) -> bytes:
    """An ICO holding an 8-bit greyscale PNG of side x side zeros."""
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b""))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def request_of(kind: str) -> tuple[bytes, dict[str, str]]:
    if kind == "huge-keys":
        return huge_keys(), {"Content-Type": "application/json"}
    if kind == "gzip-bomb":
        return gzip_bomb(), {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    if kind == "ico-bomb":
        image = base64.b64encode(ico_bomb()).decode("ascii")
        return json.dumps({"prompt": "a", "steps": 1, "init_image": image}).encode(), {"Content-Type": "application/json"}
    raise ValueError(kind)


# -- the attacker (its own process) ---------------------------------------------------------------


async def post_raw(host: str, port: int, body: bytes, headers: dict[str, str]) -> str:
    """One POST /v1/jobs on a fresh connection; the answer's status, or the error that ended it."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError) as exc:
        return type(exc).__name__
    reading = asyncio.ensure_future(reader.readline())  # read while sending, as curl does: an early answer ends the send
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": str(len(body)), "Connection": "close"}.items())
        writer.write(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        for start in range(0, len(body), 2**18):
            if reading.done():
                break
            writer.write(body[start : start + 2**18])
            await asyncio.wait_for(writer.drain(), 30)
    except (OSError, asyncio.TimeoutError):
        pass  # the gateway answered and closed before the body was all sent
    try:
        line = await asyncio.wait_for(reading, 30)
        return line.split()[1].decode() if len(line.split()) > 1 else "no answer"
    except (OSError, asyncio.TimeoutError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def slow_body(host: str, port: int, hold_s: float) -> str:
    """Headers, then one body byte a second until answered or `hold_s` passes."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError) as exc:
        return type(exc).__name__
    try:
        writer.write(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode())
        reading = asyncio.ensure_future(reader.readline())
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline and not reading.done():
            writer.write(b" ")
            await asyncio.wait([reading], timeout=1.0)
        if not reading.done():
            reading.cancel()
            return "held"
        line = reading.result()
        return line.split()[1].decode() if len(line.split()) > 1 else "closed"
    except OSError as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def attack(args: argparse.Namespace) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # room for the slow connections
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    host, port = args.url.removeprefix("http://").split(":")
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + args.duration
    if args.attack == "none":
        print("READY", flush=True)
        await asyncio.sleep(args.duration)
        body = b""
    elif args.attack == "slow-body":
        results = await asyncio.gather(*(slow_body(host, int(port), args.duration) for _ in range(args.slow_connections)))
        answers.update(results)
    else:
        body, headers = request_of(args.attack)
        print("READY", flush=True)

        async def client() -> None:
            while time.monotonic() < deadline:
                answers[await post_raw(host, int(port), body, headers)] += 1

        await asyncio.gather(*(client() for _ in range(args.clients)))
    print(json.dumps({"answers": dict(answers), "bytes": 0 if args.attack == "slow-body" else len(body)}), flush=True)


# -- the measuring side ---------------------------------------------------------------------------


async def poll_healthz(url: str, stop: asyncio.Event) -> list[float]:
    """Back-to-back GET /healthz on one keep-alive connection; a failed or timed-out poll counts as
    the time it took."""
    import aiohttp

    seconds: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=30)) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                async with http.get(f"{url}/healthz") as r:
                    await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            seconds.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
    return seconds


async def one_class(url: str, gateway_pid: int, kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--attack", kind, "--url", url, "--duration", str(args.duration),
           "--clients", str(args.clients), "--slow-connections", str(args.slow_connections)]
    attacker = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    if kind != "slow-body":
        await asyncio.wait_for(attacker.stdout.readline(), 120)  # READY once its body is built
    stop = asyncio.Event()
    with RssSampler({"gateway": gateway_pid}, every_s=0.05) as rss:
        polling = asyncio.ensure_future(poll_healthz(url, stop))
        out, _ = await asyncio.wait_for(attacker.communicate(), args.duration + 60)
        stop.set()
        seconds = await polling
    report = json.loads(out.decode().strip().splitlines()[-1])
    return {"class": kind, "healthz": summary_ms(seconds), "polls": len(seconds), "gateway_peak_rss_mb": round(rss.peak["gateway"] * 2**20 / 1e6, 1), **report}


async def main(args: argparse.Namespace) -> int:
    kinds = [args.only] if args.only else list(CLASSES)
    results: dict = {"config": vars(args), "machine": machine(), "targets": {"healthz_p99_ms": TARGET_P99_MS, "rss_mb": TARGET_RSS_MB}, "runs": []}
    async with AsyncExitStack() as es:
        stack = await open_stack(es)
        for kind in kinds:
            print(f"{kind} ...", flush=True)
            results["runs"].append(await one_class(stack.url, stack.gateway.pid, kind, args))
    path = write_results("hostile", results)
    rows = [[r["class"], r["polls"], r["healthz"]["p50_ms"], r["healthz"]["p99_ms"], r["healthz"]["max_ms"], r["gateway_peak_rss_mb"],
             ", ".join(f"{k} x{v}" for k, v in sorted(r["answers"].items()))] for r in results["runs"]]
    print()
    print(markdown_table(["class", "healthz polls", "p50 ms", "p99 ms", "max ms", "gateway peak RSS MB", "attackers' answers"], rows))
    worst_p99 = max(r["healthz"]["p99_ms"] for r in results["runs"])
    worst_rss = max(r["gateway_peak_rss_mb"] for r in results["runs"])
    print(f"\ntargets: healthz p99 <= {TARGET_P99_MS:.0f} ms: {'met' if worst_p99 <= TARGET_P99_MS else 'NOT met'} (worst {worst_p99});"
          f" RSS <= {TARGET_RSS_MB:.0f} MB: {'met' if worst_rss <= TARGET_RSS_MB else 'NOT met'} (worst {worst_rss})")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=positive, default=10.0, help="seconds each class is sent")
    parser.add_argument("--clients", type=whole(1), default=3, help="attacking clients per class, each on a fresh connection per request")
    parser.add_argument("--slow-connections", type=whole(1), default=2100, help="connections of the slow-body class (more than the gateway's --max-connections, 2048)")
    parser.add_argument("--only", choices=CLASSES, help="one class only")
    parser.add_argument("--attack", choices=CLASSES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.attack:
        asyncio.run(attack(parsed))
        sys.exit(0)
    sys.exit(asyncio.run(main(parsed)))
