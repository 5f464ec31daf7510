"""One HTTP POST of one event to one endpoint, signed (Standard Webhooks).

With tracing on (ops/tracing.py), each attempt is a CLIENT span whose W3C trace
context travels in the request's headers, so a receiver that traces continues it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from pagemeter_server.domain.events import Event, cloudevent_json
from pagemeter_server.domain.webhooks import Endpoint, signature_headers

USER_AGENT = "pagemeter-webhooks/1"
# A receiver's answer body is not used; at most this much of it is read (for the log).
MAX_ANSWER_READ = 512


@dataclass(frozen=True)
class Attempt:
    ok: bool
    status: int  # 0: no HTTP answer
    duration_s: float
    error: str  # '' when ok
    reason: str  # status, timeout or connection ('' when ok)


class Sender:
    """Posts events; one connection pool for the dispatcher."""

    def __init__(self, timeout_s: float, max_in_flight: int, tracer: Tracer | None = None) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_in_flight = max_in_flight
        self._session: aiohttp.ClientSession | None = None
        # A span per attempt when tracing is on; None: no cost.
        self.tracer = tracer

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_in_flight),
                timeout=self.timeout,
                headers={"user-agent": USER_AGENT},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, endpoint: Endpoint, event: Event, now_ms: int) -> Attempt:
        if self.tracer is None:
            return await self._send(endpoint, event, now_ms)
        with self.tracer.start_as_current_span(
            "webhook delivery",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                # The host only: a URL's path or query may carry the receiver's token.
                "server.address": urlsplit(endpoint.url).hostname or "",
                "pagemeter.org_id": event.org_id,
                "pagemeter.event_id": event.id,
                "pagemeter.event_type": event.type,
                "pagemeter.endpoint_id": endpoint.endpoint_id,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            attempt = await self._send(endpoint, event, now_ms)
            _record_attempt(span, attempt)
            return attempt

    async def _send(self, endpoint: Endpoint, event: Event, now_ms: int) -> Attempt:
        body = cloudevent_json(event)
        headers = signature_headers(
            event.id, body, endpoint.signing_secrets(now_ms), int(time.time())
        )
        if self.tracer is not None:
            propagate.inject(headers)  # traceparent: outside the signed content
        started = time.perf_counter()
        try:
            async with self._client().post(
                endpoint.url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                await answer.content.read(MAX_ANSWER_READ)
                status = answer.status
        except TimeoutError:
            return Attempt(False, 0, time.perf_counter() - started, "timed out", "timeout")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Attempt(False, 0, time.perf_counter() - started, _describe(exc), "connection")
        except asyncio.CancelledError:
            raise
        took = time.perf_counter() - started
        if 200 <= status < 300:
            return Attempt(True, status, took, "", "")
        return Attempt(False, status, took, f"HTTP {status}", "status")


def _record_attempt(span: Span, attempt: Attempt) -> None:
    if attempt.status:
        span.set_attribute("http.response.status_code", attempt.status)
    if not attempt.ok:
        # status (a non-2xx answer), timeout or connection, as the delivery log says.
        span.set_attribute("error.type", attempt.reason)
        span.set_status(Status(StatusCode.ERROR, attempt.error))


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:300]
