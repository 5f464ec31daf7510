"""The servicer context of an HTTP call: what the handlers use of gRPC's.

The handlers and interceptors read the caller's metadata, the time left, and
answer failures by aborting with a status. For an HTTP call the metadata are
the request's headers (names in lower case, as gRPC gives them), there is no
deadline, and an abort raises `HttpAbort`, which the gateway turns into a
google.rpc.Status JSON answer. `HttpAbort` is a grpc.aio.AbortError, so every
handler and interceptor treats it exactly as a gRPC abort.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import grpc


class HttpAbort(grpc.aio.AbortError):
    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


class _Status(grpc.Status):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[Any] = ()
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


class HttpServicerContext:
    """The part of grpc.aio.ServicerContext pagemeter's handlers and interceptors use."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._metadata = metadata
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[Any, ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None  # HTTP callers send no deadline

    def peer(self) -> str:
        return self._peer

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> NoReturn:
        await self.abort_with_status(_Status(code, details, trailing_metadata))

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self._code = status.code
        self._details = status.details
        self._trailing = tuple(status.trailing_metadata or ())
        raise HttpAbort(status)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, trailing_metadata: Sequence[Any]) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._trailing
