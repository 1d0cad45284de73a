"""Reads of the native API the tests share: the job list by prompt, a job's WebSocket events."""

from __future__ import annotations

import asyncio


async def jobs_with_prompt(http, url: str, prompt: str) -> list[dict]:
    async with http.get(f"{url}/v1/jobs") as r:
        return [j for j in await r.json() if j["request"].get("prompt") == prompt]


async def ws_events(http, url, job_id, *, limit: int = 200) -> list[dict]:
    events = []
    async with http.ws_connect(f"{url}/v1/jobs/{job_id}/ws") as ws:
        async with asyncio.timeout(60):
            async for message in ws:
                events.append(message.json())
                if events[-1]["type"] in ("done", "failed", "cancelled", "expired") or len(events) >= limit:
                    break
    return events
