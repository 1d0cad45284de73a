"""Per-key quotas of unfinished jobs that hold across every gateway: KV `imagegen-quota` keeps, per key,
the ids of the jobs it reserved (with when), changed only by compare-and-set, so two gateways that take
the last place at the same moment cannot both have it.

A submit reserves its jobs' ids before it writes any record. Each reservation first drops the ids whose
job has ended (done, failed, cancelled, expired or deleted: read from the gateway's queue view, and from
the record itself before a refusal), and those with no record RECORD_GRACE_S after they were reserved (a
gateway that died between the reservation and the record), so a place comes back whoever ended the job:
a worker, a cancel, the expiry sweep, or nobody at all. A submit that fails before queueing gives its
places back at once.
"""

from __future__ import annotations

import json
import time
from typing import Callable

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.http.ratelimit import RateLimited
from schemas import jobstore
from schemas.status import JobStatus

RECORD_GRACE_S = 120.0  # a reserved job with no record after this was never queued
RETRY_AFTER_S = 2


def _key(name: str) -> str:
    return name.encode().hex() or "00"


async def _read(kv: KeyValue, key: str) -> tuple[dict[str, float], int | None]:
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return {}, None
    try:
        held = json.loads(entry.value or b"{}")
    except ValueError:
        held = {}
    return ({str(k): float(v) for k, v in held.items()} if isinstance(held, dict) else {}), entry.revision


async def _write(kv: KeyValue, key: str, held: dict[str, float], revision: int | None) -> None:
    value = json.dumps(held, separators=(",", ":")).encode()
    if revision is None:
        await kv.create(key, value)
    else:
        await kv.update(key, value, last=revision)


def _ended(status: JobStatus | None) -> bool:
    return status is not None and (status.deleted or status.state.final)


async def reserve(
    kv: KeyValue,
    status_kv: KeyValue,
    name: str,
    job_ids: list[str],
    *,
    limit: int,
    seen: Callable[[str], JobStatus | None] = lambda job_id: None,
    now: float | None = None,
    tries: int = 100,
) -> None:
    """Reserves places for `job_ids` in key `name`'s quota of `limit` unfinished jobs, or raises
    RateLimited (nothing reserved). Ids it holds already count once. `seen`: the gateway's copy of a
    job's record, if it has one (a record it holds as ended spares a read)."""
    key = _key(name)
    for _ in range(tries):
        now = time.time() if now is None else now
        held, revision = await _read(kv, key)
        kept = {job_id: at for job_id, at in held.items() if not _ended(seen(job_id))}
        wanted = [job_id for job_id in job_ids if job_id not in kept]
        if len(kept) + len(wanted) > limit:  # before refusing, ask each record itself
            for job_id, at in list(kept.items()):
                if job_id in job_ids:
                    continue
                status = await jobstore.read_status(status_kv, job_id)
                if _ended(status) or (status is None and now - at > RECORD_GRACE_S):
                    del kept[job_id]
        if len(kept) + len(wanted) > limit:
            active = len(kept)
            more = f"; {len(wanted)} more would exceed it" if len(wanted) > 1 else ""
            raise RateLimited(
                f"key {name!r} has {active} unfinished jobs, its quota is {limit} (max_concurrent){more}; "
                "retry when one has ended", RETRY_AFTER_S,
            )
        for job_id in wanted:
            kept[job_id] = now
        if kept == held and revision is not None:
            return
        try:
            await _write(kv, key, kept, revision)
            return
        except KeyWrongLastSequenceError:  # another submit of this key changed it meanwhile
            now = None
            continue
    raise RateLimited(f"the quota of key {name!r} is too contended; retry", 1)


async def release(kv: KeyValue, name: str, job_ids: list[str], *, tries: int = 100) -> None:
    """Gives back the places of jobs that were reserved and not queued after all."""
    key = _key(name)
    for _ in range(tries):
        held, revision = await _read(kv, key)
        if revision is None or not any(job_id in held for job_id in job_ids):
            return
        for job_id in job_ids:
            held.pop(job_id, None)
        try:
            await _write(kv, key, held, revision)
            return
        except KeyWrongLastSequenceError:
            continue
