"""Webhooks: a job's start and end POSTed to the URL its request names (`webhook`).

Which gateway calls: every gateway watches every record (gateway.state.queue_view). When a record with a
webhook shows its job started or ended, the gateway publishes the call on
`imagegen.webhooks.<job_id>.<start|completed>` with the Nats-Msg-Id `<job_id>.<moment>`, so the
stream IMAGEGEN_WEBHOOKS keeps it once however many gateways saw it, and the gateways' shared durable
consumer hands it to one of them. A gateway that stops mid-call leaves it to another after the
consumer's ack wait. Jobs queued straight over NATS get their webhooks the same way. A gateway that
starts reads every record again; moments older than the stream's duplicate window are not published
again (the ones within it are published and dropped as duplicates).

The call: POST with the job as `GET /v1/jobs/{id}` shows it, as it was at that moment, and the
headers of Standard Webhooks (`webhook-id`, `webhook-timestamp`, and with a secret set,
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), plus `X-Imagegen-Event`. A 2xx
answer ends it; a network error, a timeout, 408, 429 or 5xx is tried again after each of `retry_s`;
any other answer, or the last try failing, gives up, with a log line naming the job and the answer.

Where a call may go: the URL's host is first read the way an HTTP client reads it (percent-escapes
decoded, IDNA/UTS-46: full-width digits, ideographic full stops, upper case), and that form is checked
and is what the call goes to (the request keeps it). It must be a plain ASCII name, or an address as
four decimal numbers or in IPv6 (any other IPv4 spelling is refused). Unless the gateway runs with
--webhook-allow-private, localhost and an address that is not public (loopback, private, link-local,
reserved, or one of those inside an IPv6 address) are refused at submit; a name is resolved once at
the call, its addresses that are not public dropped, and the call connects to one that is left (no
second lookup, so a name that points elsewhere by then is caught too). Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
from typing import Any, Callable
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import idna
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import names
from schemas.codec import DecodeError, decode, encode
from schemas.request import RequestInvalid
from schemas.status import JobState, JobStatus

log = logging.getLogger("imagegen.gateway.http.webhooks")

RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # waits before each try after the first
CALL_TIMEOUT_S = 10.0  # one call, connecting included (below the consumer's ack wait)
MAX_CALLS = 64  # calls in flight per gateway
MAX_ANSWER_BYTES = 64 * 1024  # of a receiver's answer, read and dropped
MAX_PUBLISHING = 64  # publishes awaiting their ack at once
MAX_UNPUBLISHED = 10_000  # moments waiting to be published while the broker is slow or away
RETRIED_STATUSES = frozenset({408, 429})
DEFAULT_MOMENTS = ("completed",)


# -- where a call may go -------------------------------------------------------------------------


IPV4_IN_LAST_32_BITS = tuple(ipaddress.ip_network(n) for n in (
    "::/96",  # IPv4-compatible
    "::ffff:0:0/96",  # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
    "64:ff9b::/96",  # NAT64
    "64:ff9b:1::/48",  # local-use NAT64
))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and may be routed to: in its last 32 bits
    (compatible, mapped, translated, NAT64), 6to4 (2002:ab:cd::) and Teredo."""
    found = [ip.sixtofour] if ip.sixtofour is not None else []
    if ip.teredo is not None:
        found += list(ip.teredo)
    if any(ip in network for network in IPV4_IN_LAST_32_BITS):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def public_address(address: str) -> bool:
    """Whether a call may go to this IP address: global unicast, and so is every IPv4 address it
    carries."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    return all(a.is_global and not a.is_multicast for a in (ip, *inner))


def legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address the C library reads `host` as when it is written another way than four decimal
    numbers (127.1, 2130706433, 0177.0.0.1, 0x7f.1), which some clients connect to as such; else None."""
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None
    try:
        if str(ipaddress.IPv4Address(host)) == host:
            return None
    except ValueError:
        pass
    return ipaddress.IPv4Address(packed)


HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
NUMBER_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def invalid(message: str) -> RequestInvalid:
    return RequestInvalid([{"field": "webhook", "message": message}])


def normalised_host(raw: str) -> str:
    """`raw` (a URL's host as written) the way an HTTP client reads it: percent-escapes decoded, then
    mapped by IDNA/UTS-46 (NFKC: full-width digits and letters, the ideographic full stops 。｡．, upper
    case), a name as its ASCII (punycode) form, an IPv6 address in its short form, no final dot.
    RequestInvalid when no valid host comes out."""
    try:
        host = unquote(raw, errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:
        raise invalid(f"host {raw[:80]!r} is not a valid host name (percent-escapes that are not UTF-8)") from None
    if ":" in host:  # only an IPv6 literal has one (urlsplit took the brackets and the port off)
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0]).compressed
        except ValueError:
            raise invalid(f"host {raw[:80]!r} is not a valid IPv6 address") from None
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise invalid(f"host {raw[:80]!r} is not a valid host name ({exc})") from None
    return host.lower().removesuffix(".")


def check_host(host: str, *, allow_private: bool) -> None:
    """RequestInvalid unless `host` (normalised) is a plain ASCII name, or, unless private destinations
    are allowed, a public IP address written as such."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if not allow_private and not public_address(host):
            inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
            host += f" (carrying {', '.join(map(str, inner))})" if inner else ""
            raise invalid(f"address {host} is not public (loopback, private, link-local or reserved); webhooks go to public addresses only")
        return
    labels = host.split(".")
    if len(host) > 253 or not all(HOST_LABEL.match(label) for label in labels):
        raise invalid(f"host {host[:80]!r} is not a valid host name (an empty or over-long label, or a character other than a-z, 0-9, '-' and '_')")
    legacy = legacy_ipv4(host)
    if legacy is not None or NUMBER_LABEL.match(labels[-1]):  # WHATWG URL parsers read such a host as IPv4
        seen = f"the IPv4 address {legacy}" if legacy is not None else "an IPv4 address"
        raise invalid(f"host {host!r} reads as {seen}; write an address as four decimal numbers")
    if not allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise invalid(f"host {host!r} is this machine; webhooks go to public addresses only")


def check_destination(url: str, *, allow_private: bool) -> str:
    """The URL a webhook call goes to: `url` with its host normalised as an HTTP client reads it
    (normalised_host), so what is checked is what is called. RequestInvalid when that host is not a
    plain ASCII name or an address written as four decimal numbers or in IPv6, or, unless private
    destinations are allowed, when it is localhost or an address that is not public. Names are checked
    again when the call resolves them (PublicOnlyResolver)."""
    parts = urlsplit(url)
    if parts.hostname is None:
        raise invalid("must name a host")
    try:
        port = parts.port
    except ValueError as exc:
        raise invalid(f"not a URL: {exc}") from None
    host = normalised_host(parts.hostname)
    check_host(host, allow_private=allow_private)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class NotPublic(OSError):
    """A webhook's host name resolves only to addresses it may not go to."""


class PublicOnlyResolver(AbstractResolver):
    """The system resolver, less every address that is not public: a name that resolves to none left
    fails to connect, naming why."""

    def __init__(self) -> None:
        self.inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        kept = [r for r in found if public_address(r["host"])]
        if not kept:
            raise NotPublic(f"{host} resolves only to addresses that are not public ({', '.join(r['host'] for r in found[:4])})")
        return kept

    async def close(self) -> None:
        await self.inner.close()


# -- publishing the moments ----------------------------------------------------------------------


def moments(old: JobStatus | None, new: JobStatus) -> list[tuple[str, float | None]]:
    """The webhook moments a record change makes, with when each happened: `start` when the job became
    running, `completed` when it ended."""
    found = []
    if new.state is JobState.RUNNING and (old is None or old.state is not JobState.RUNNING):
        found.append(("start", new.started_at))
    if new.state.final and (old is None or not old.state.final):
        found.append(("completed", new.finished_at))
    return found


class WebhookOutbox:
    """A queue view listener: publishes each webhook moment of the records it sees."""

    def __init__(self, *, window_s: float):
        self.window_s = window_s
        self.js: JetStreamContext | None = None
        self.pending: asyncio.Queue[tuple[str, JobStatus]] = asyncio.Queue(MAX_UNPUBLISHED)
        self.task: asyncio.Task | None = None

    def on_change(self, old: JobStatus | None, new: JobStatus) -> None:
        if not new.request or not new.request.get("webhook") or new.deleted:
            return
        wanted = new.request.get("webhook_events_filter") or DEFAULT_MOMENTS
        now = time.time()
        for moment, at in moments(old, new):
            if moment not in wanted or (at is not None and now - at > self.window_s):
                continue
            try:
                self.pending.put_nowait((moment, new))
            except asyncio.QueueFull:
                log.warning("job %s: webhook %s not published: %d calls wait already", new.job_id, moment, MAX_UNPUBLISHED, extra={"job_id": new.job_id})

    def start(self, js: JetStreamContext) -> None:
        self.js = js
        self.task = asyncio.create_task(self._publish_all())

    async def close(self, *, flush_s: float = 2.0) -> None:
        """Publishes what is waiting, for up to `flush_s`, and stops."""
        if self.task is None:
            return
        try:
            await asyncio.wait_for(self.pending.join(), flush_s)
        except asyncio.TimeoutError:
            log.warning("%d webhook calls left unpublished at close", self.pending.qsize())
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.task = None

    async def _publish_all(self) -> None:
        """Publishes the moments as they come, up to MAX_PUBLISHING at once (each waits for its ack)."""
        publishing: set[asyncio.Task] = set()
        room = asyncio.Semaphore(MAX_PUBLISHING)
        try:
            while True:
                moment, status = await self.pending.get()
                await room.acquire()
                task = asyncio.create_task(self._publish(moment, status))
                publishing.add(task)
                task.add_done_callback(lambda done: (publishing.discard(done), room.release(), self.pending.task_done()))
        finally:
            for task in publishing:
                task.cancel()

    async def _publish(self, moment: str, status: JobStatus) -> None:
        for wait_s in (0.5, 2.0, 5.0, None):
            try:
                await self.js.publish(
                    names.webhooks_subject(status.job_id, moment), encode(status),
                    headers={names.MSG_ID_HEADER: f"{status.job_id}.{moment}"},
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker slow or away: other gateways publish it too
                if wait_s is None:
                    log.warning("job %s: webhook %s not published: %s", status.job_id, moment, exc, extra={"job_id": status.job_id})
                    return
                await asyncio.sleep(wait_s)


# -- making the calls ----------------------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """A Standard Webhooks secret (`whsec_` and base64) as its key bytes; any other text as UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except ValueError:
            pass
    return secret.encode()


def signature(key: bytes, call_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{call_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    """Takes webhook calls from the shared consumer and makes them, MAX_CALLS at a time."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        render: Callable[[JobStatus], dict[str, Any]],
        secret: str | None = None,
        allow_private: bool = False,
        retry_s: tuple[float, ...] = RETRY_S,
        on_outcome: Callable[[str, str], None] = lambda moment, outcome: None,
    ):
        self.js = js
        self.render = render
        self.key = signing_key(secret) if secret else None
        self.allow_private = allow_private
        self.retry_s = retry_s
        self.on_outcome = on_outcome  # (moment, delivered | retried | given_up) of every call made
        self.slot_freed = asyncio.Event()  # set while fewer than MAX_CALLS calls are in flight
        self.slot_freed.set()
        self.calls: set[asyncio.Task] = set()
        self.task: asyncio.Task | None = None
        self.http: aiohttp.ClientSession | None = None
        self.resolver: PublicOnlyResolver | None = None

    async def start(self) -> None:
        self.sub = await self.js.pull_subscribe_bind(durable=names.WEBHOOK_SENDERS, stream=names.WEBHOOKS_STREAM)
        self.resolver = None if self.allow_private else PublicOnlyResolver()
        connector = aiohttp.TCPConnector(limit=MAX_CALLS, resolver=self.resolver)
        self.http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
        self.task = asyncio.create_task(self._take_calls())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for call in list(self.calls):  # not acked: the consumer hands them out again after its ack wait
            call.cancel()
        await asyncio.gather(*self.calls, return_exceptions=True)
        if self.http is not None:
            await self.http.close()
        if self.resolver is not None:
            await self.resolver.close()
        try:
            await self.sub.unsubscribe()
        except Exception:  # the connection is closing anyway
            pass

    async def _take_calls(self) -> None:
        """Takes the calls one by one while fewer than MAX_CALLS are in flight."""
        while True:
            await self.slot_freed.wait()
            free = MAX_CALLS - len(self.calls)
            if free <= 0:
                self.slot_freed.clear()
                continue
            try:
                msgs = await self.sub.fetch(1, timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nothing to do within the timeout, or the broker away
                if not isinstance(exc, asyncio.TimeoutError):
                    await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                call = asyncio.create_task(self._call(msg))
                self.calls.add(call)
                call.add_done_callback(self._call_done)

    def _call_done(self, call: asyncio.Task) -> None:
        self.calls.discard(call)
        self.slot_freed.set()

    async def _call(self, msg: Msg) -> None:
        try:
            await self._make_call(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, or the broker gone between the call and its ack: logged, not lost
            log.exception("webhook message %s: %s", msg.subject, exc)
            try:
                await msg.nak(delay=self.retry_s[-1] if self.retry_s else 60.0)
            except Exception:  # the consumer hands it out again after its ack wait
                pass

    async def _make_call(self, msg: Msg) -> None:
        moment = msg.subject.rsplit(".", 1)[-1]
        tries = msg.metadata.num_delivered
        try:
            status = decode(msg.data, JobStatus)
        except DecodeError as exc:
            log.warning("webhook message %s unreadable, dropped: %s", msg.subject, exc)
            await msg.term()
            return
        url = status.request.get("webhook") or ""
        started = time.monotonic()
        outcome, retry = await self._post(url, status, moment)
        took = time.monotonic() - started
        extra = {"job_id": status.job_id}
        if outcome is None:
            log.info("job %s: webhook %s delivered, try %d, %.3fs", status.job_id, moment, tries, took, extra=extra)
            self.on_outcome(moment, "delivered")
            await msg.ack()
        elif retry and tries <= len(self.retry_s):
            delay = self.retry_s[tries - 1]
            log.info("job %s: webhook %s try %d failed (%s), %.3fs; again in %gs", status.job_id, moment, tries, outcome, took, delay, extra=extra)
            self.on_outcome(moment, "retried")
            await msg.nak(delay=delay)
        else:
            log.warning("job %s: webhook %s to %s given up after try %d: %s", status.job_id, moment, url, tries, outcome, extra=extra)
            self.on_outcome(moment, "given_up")
            await msg.term()

    async def _post(self, url: str, status: JobStatus, moment: str) -> tuple[str | None, bool]:
        """(None, _) when the receiver took the call; else (what went wrong, whether to try again)."""
        try:
            url = check_destination(url, allow_private=self.allow_private)
        except RequestInvalid as exc:
            return str(exc), False
        body = json.dumps(self.render(status)).encode()
        call_id = f"{status.job_id}.{moment}"
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "imagegen-webhooks",
            "webhook-id": call_id,
            "webhook-timestamp": str(timestamp),
            "X-Imagegen-Event": moment,
        }
        if self.key is not None:
            headers["webhook-signature"] = signature(self.key, call_id, timestamp, body)
        try:
            async with self.http.post(url, data=body, headers=headers, allow_redirects=False) as answer:
                await answer.content.read(MAX_ANSWER_BYTES)  # what the receiver says is not kept
                if 200 <= answer.status < 300:
                    return None, False
                retry = answer.status >= 500 or answer.status in RETRIED_STATUSES
                return f"answered {answer.status}", retry
        except asyncio.TimeoutError:
            return f"no answer within {CALL_TIMEOUT_S:g}s", True
        except (aiohttp.InvalidURL, ValueError) as exc:  # ValueError: a host name IDNA refuses
            return f"invalid URL: {exc}", False
        except (aiohttp.ClientError, OSError) as exc:
            refused = isinstance(getattr(exc, "os_error", None), NotPublic)
            return f"{getattr(exc, 'os_error', None) if refused else type(exc).__name__ + ': ' + str(exc)}", not refused
