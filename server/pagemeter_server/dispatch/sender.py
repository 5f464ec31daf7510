"""One HTTP POST of one event to one endpoint, signed (Standard Webhooks)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

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

    def __init__(self, timeout_s: float, max_in_flight: int) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_in_flight = max_in_flight
        self._session: aiohttp.ClientSession | None = None

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
        body = cloudevent_json(event)
        headers = signature_headers(
            event.id, body, endpoint.signing_secrets(now_ms), int(time.time())
        )
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


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:300]
